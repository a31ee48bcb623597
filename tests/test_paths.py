"""paths.write_out: a file the user names with --out is written as a new file, or replaced whole with --force, and
never through a file or symbolic link that someone put there after the command checked the path."""

from __future__ import annotations

import os

import pytest

from codemoat.paths import write_out


def test_a_new_file_is_written(tmp_path):
    out = tmp_path / "model.gguf"
    write_out(out, b"weights", force=False)
    assert out.read_bytes() == b"weights"
    assert not out.is_symlink()


def test_without_force_an_existing_file_or_a_planted_link_is_refused_and_left_alone(tmp_path):
    """The attacker's move: in a folder they can write to, a link (or a file of theirs) appears at --out between
    the command's check and its write. The write is refused; the link's target is not truncated or written."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"someone else's file")
    link = tmp_path / "plain.gguf"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_out(link, b"decrypted weights", force=False)
    assert victim.read_bytes() == b"someone else's file"
    assert link.is_symlink()
    dangling = tmp_path / "dangling.gguf"
    dangling.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(FileExistsError):
        write_out(dangling, b"decrypted weights", force=False)
    assert not (tmp_path / "would-be-created").exists()
    theirs = tmp_path / "theirs.gguf"
    theirs.write_bytes(b"planted")
    with pytest.raises(FileExistsError):
        write_out(theirs, b"decrypted weights", force=False)
    assert theirs.read_bytes() == b"planted"


def test_with_force_a_link_is_replaced_not_followed_and_nothing_is_left_behind(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"someone else's file")
    out = tmp_path / "plain.gguf"
    out.symlink_to(victim)
    write_out(out, b"decrypted weights", force=True)
    assert not out.is_symlink() and out.read_bytes() == b"decrypted weights"
    assert victim.read_bytes() == b"someone else's file"
    write_out(out, b"v2", force=True)  # an existing regular file: replaced whole
    assert out.read_bytes() == b"v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.gguf", "victim.txt"]


def test_a_failed_forced_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "plain.gguf"
    out.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_out(out, "not bytes", force=True)  # type: ignore[arg-type]
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plain.gguf"]
    assert os.listdir(tmp_path) == ["plain.gguf"]
