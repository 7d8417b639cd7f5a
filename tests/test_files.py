"""atomic_write: all or nothing."""
import pytest

from tinyunet.files import atomic_write


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "result.txt"
    atomic_write(path, lambda stream: stream.write(b"first"))

    def crash(stream):
        stream.write(b"half of the sec")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_creates_the_folder(tmp_path):
    path = atomic_write(tmp_path / "a" / "b.bin", lambda stream: stream.write(b"x"))
    assert path.read_bytes() == b"x"
