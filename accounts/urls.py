from django.contrib.auth import views as auth_views
from django.urls import path

from accounts import ratelimit, views

urlpatterns = [
    path("", views.home, name="home"),
    path(
        "login/",
        # Django's LoginView with failed sign-ins rate limited per client (accounts.ratelimit).
        ratelimit.LoginView.as_view(
            template_name="accounts/login.html", redirect_authenticated_user=True
        ),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]
