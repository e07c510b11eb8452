"""A password hasher for the test process only.

Django's PBKDF2 runs a million rounds: about 0.3 s per ``UserFactory`` user on the development
machine, minutes over the suite. This one runs a thousand. Its hashes are ordinary
``pbkdf2_sha256`` hashes that carry their round count, so the real hasher in any other process
(a uvicorn server started by a test) verifies them as they are.
"""

from __future__ import annotations

from django.contrib.auth.hashers import PBKDF2PasswordHasher


class FastPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    iterations = 1000
