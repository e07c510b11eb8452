from pathlib import Path

from django.conf import settings


def test_the_suite_uses_its_own_data_dir():
    assert Path(settings.DATA_DIR).name == "test"
