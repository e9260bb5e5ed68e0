"""The data plane's JSON (orjson) reads as DRF's own renderer writes it."""

import datetime as dt
import decimal
import json
import uuid

import numpy as np
from rest_framework.renderers import JSONRenderer

from apps.core.renderers import FastJSONRenderer
from worker.serving import fastpath


def test_the_fast_renderer_writes_what_drf_writes() -> None:
    data = {
        "outputs": [{"label": "card_arrival", "score": 0.9134, "scores": {"a": 0.0866}}],
        "when": dt.datetime(2026, 12, 2, 4, 30, 1, 250, tzinfo=dt.UTC),
        "id": uuid.UUID(int=7),
        "amount": decimal.Decimal("4.50"),
        "text": "déjà vu \u2028 next line",
        "none": None,
        "count": 3,
    }
    assert FastJSONRenderer().render(data) == JSONRenderer().render(data)
    assert FastJSONRenderer().render(None) == b""
    # A float's exponent is spelt without the standard library's leading zero: same value.
    tiny = {"score": 1e-9}
    assert FastJSONRenderer().render(tiny) == b'{"score":1e-9}'
    assert json.loads(FastJSONRenderer().render(tiny)) == json.loads(JSONRenderer().render(tiny))


def test_a_float32_array_goes_at_its_own_precision_and_comes_back_equal() -> None:
    vectors = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    body = FastJSONRenderer().render({"embeddings": vectors})
    assert np.array_equal(np.asarray(json.loads(body)["embeddings"], dtype=np.float32), vectors)
    # Through a replica's frame and back, as the web tier reads it.
    frame = fastpath.encode({"embeddings": vectors, "dim": 8})
    message = fastpath.decode(frame[4:])
    assert np.array_equal(np.asarray(message["embeddings"], dtype=np.float32), vectors)
    assert len(body) < len(json.dumps({"embeddings": vectors.tolist()}))
