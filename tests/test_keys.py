"""Key rules, the seed's render-asset layout and content types (no network)."""

import pytest

from ctrlupload import InvalidKeyError, guess_content_type, render_asset_key, validate_key


@pytest.mark.parametrize(
    "key",
    [
        "videos/V-001/S-001/JOB-123/video.mp4",
        "a",
        "동영상/비디오.mp4",
        "x" * 1024,
        "dir/file with spaces.jpg",
    ],
)
def test_valid_keys_pass_unchanged(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "empty"),
        ("/videos/a.mp4", "start with '/'"),
        ("videos/../etc/passwd", "'..' segment"),
        ("videos/./a.mp4", "'.' segment"),
        ("..", "'..' segment"),
        ("videos\\a.mp4", "backslash"),
        ("videos/a\x00.mp4", "control characters"),
        ("videos/a\n.mp4", "control characters"),
        ("videos/a\x7f.mp4", "control characters"),
        ("videos//a.mp4", "empty segment"),
        ("videos/", "empty segment"),
        ("x" * 1025, "over the limit of 1024"),
        ("가" * 342, "1026 bytes in UTF-8"),
        ("bad\udcffsurrogate", "UTF-8"),
    ],
)
def test_invalid_keys_raise_with_the_rule_broken(key: str, reason: str) -> None:
    with pytest.raises(InvalidKeyError) as caught:
        validate_key(key)
    assert reason in str(caught.value)
    assert caught.value.phase == "validate"
    assert caught.value.code == "STORAGE_UPLOAD_FAILED"


def test_invalid_key_message_escapes_control_characters() -> None:
    with pytest.raises(InvalidKeyError) as caught:
        validate_key("a\nb")
    assert "\n" not in str(caught.value)


def test_non_string_key_is_rejected() -> None:
    with pytest.raises(InvalidKeyError, match="must be a str"):
        validate_key(b"videos/a.mp4")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("asset", "filename"),
    [("video", "video.mp4"), ("subtitles", "subtitles.srt"), ("thumbnail", "thumb.jpg")],
)
def test_render_asset_key_follows_the_seed_layout(asset: str, filename: str) -> None:
    key = render_asset_key("V-001", "S-001", "JOB-123", asset)  # type: ignore[arg-type]
    assert key == f"videos/V-001/S-001/JOB-123/{filename}"


@pytest.mark.parametrize(
    ("ids", "problem"),
    [
        (("", "S", "J"), "video_id"),
        (("V", "S/x", "J"), "script_id"),
        (("V", "S", ".."), "job_id must not be '..'"),
    ],
)
def test_render_asset_key_rejects_bad_ids(ids: tuple[str, str, str], problem: str) -> None:
    with pytest.raises(InvalidKeyError, match=problem):
        render_asset_key(*ids, "video")


def test_render_asset_key_rejects_unknown_asset() -> None:
    with pytest.raises(InvalidKeyError, match="unknown asset"):
        render_asset_key("V", "S", "J", "poster")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "content_type"),
    [
        ("videos/a/video.mp4", "video/mp4"),
        ("VIDEO.MP4", "video/mp4"),
        ("s/subtitles.srt", "application/x-subrip"),
        ("t/thumb.jpg", "image/jpeg"),
        ("t/thumb.jpeg", "image/jpeg"),
        ("x/data.bin", "application/octet-stream"),
        ("noext", "application/octet-stream"),
    ],
)
def test_content_type_follows_the_extension(key: str, content_type: str) -> None:
    assert guess_content_type(key) == content_type
