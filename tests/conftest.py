import json
import pathlib

import pytest

VECTORS_PATH = pathlib.Path(__file__).resolve().parents[2] / "shared" / "vectors" / "mtop-v1.json"


@pytest.fixture(scope="session")
def vectors():
    if not VECTORS_PATH.exists():
        pytest.fail(f"wire vectors missing at {VECTORS_PATH}: the checkout needs ../shared beside it")
    return json.loads(VECTORS_PATH.read_text())
