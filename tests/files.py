"""Small file helpers the test modules share."""

import hashlib
from pathlib import Path


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's content, read in chunks (guest images are GiBs)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
