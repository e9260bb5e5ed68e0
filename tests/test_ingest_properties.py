"""Property-based: malformed and odd files thrown at the dataset checks and the upload."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apps.core.errors import InvalidInput
from apps.datasets import ingest
from apps.datasets.models import DatasetVersion
from tests.conftest import stored_files

cell = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"), max_size=30
)
rows_strategy = st.lists(st.tuples(cell, cell), min_size=0, max_size=25)


def write_csv(rows: list[tuple[str, str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    return buffer.getvalue().encode()


def profile(path: Path, **kwargs: object) -> ingest.Profile:
    return ingest.profile_file(
        path,
        filename=kwargs.pop("filename", "data.csv"),
        fmt=None,  # type: ignore[arg-type]
        text_column="text",
        label_column="label",
        need_two_labels=True,
        max_line_bytes=4096,
        **kwargs,
    )  # type: ignore[arg-type]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=rows_strategy)
def test_well_formed_csv_is_profiled_exactly_or_refused_for_a_stated_reason(rows, tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(write_csv(rows))
    kept = rows
    try:
        result = profile(path)
    except InvalidInput as exc:
        reasons = {
            "empty": not kept,
            "empty_text": any(not t.strip() for t, _ in kept),
            "empty_label": any(not lb.strip() for _, lb in kept),
            "single_label": len({lb for _, lb in kept}) < 2,
        }
        assert reasons.get(exc.code), f"refused with {exc.code}: {exc.message}"
        return
    assert result.rows == len(kept)
    assert result.labels == dict(Counter(lb for _, lb in kept))
    assert result.duplicate_texts == len(kept) - len({t for t, _ in kept})
    assert result.preview == [{"text": t, "label": lb} for t, lb in kept[:5]]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=st.binary(max_size=400), as_json=st.booleans())
def test_arbitrary_bytes_never_crash_the_checks(content, as_json, tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    nul = content.find(b"\x00")
    try:
        result = profile(
            path, filename="x.jsonl" if as_json else "x.csv", first_nul=nul if nul >= 0 else None
        )
    except InvalidInput as exc:
        assert exc.message
        if exc.line is not None:
            assert 1 <= exc.line <= content.count(b"\n") + 1
        return
    assert result.rows >= 1 and len(result.labels) >= 2


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=st.binary(min_size=1, max_size=300))
def test_malformed_uploads_get_a_4xx_and_leave_nothing(
    content, scientist, training_dataset, upload, artifacts_dir, settings
):
    body = b"text,label\n" + content
    response = upload(scientist, training_dataset, "fuzz.csv", body)
    assert response.status_code in (200, 201, 400), response.content
    if response.status_code == 400:
        assert response.json()["error"]["message"]
        assert not DatasetVersion.objects.filter(
            sha256=__import__("hashlib").sha256(body).hexdigest()
        ).exists()
    assert len(stored_files(artifacts_dir)) == DatasetVersion.objects.count()
    assert list(settings.UPLOAD_TMP_DIR.glob("upload-*")) == []


@pytest.mark.parametrize("size", [3, 4095, 4096, 4097, 4 * 1024 * 1024 + 3])
def test_line_length_limit_is_exact_across_chunk_boundaries(size, tmp_path):
    path = tmp_path / "long.csv"
    path.write_bytes(b"text,label\nshort,a\n" + b"y" * (size - 2) + b",b\n" + b"tail,c\n")
    if size > 4096:
        with pytest.raises(InvalidInput) as caught:
            profile(path)
        assert caught.value.code == "line_too_long" and caught.value.line == 3
    else:
        assert profile(path).rows == 3
