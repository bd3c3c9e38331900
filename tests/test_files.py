"""The one atomic writer: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import stat

import pytest

from anchorless.files import atomic_path, write_atomic, write_json_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "run.json"
    write_json_atomic(target, {"epoch": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"epo')
            raise RuntimeError("disk gone")
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_files_are_private_unless_a_mode_is_asked_for(tmp_path):
    private = write_atomic(tmp_path / "sub" / "token", "secret")
    shared = write_atomic(tmp_path / "template.yaml", "kind: RayCluster\n", mode=0o644)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and private.read_text() == "secret"
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644


def test_json_documents_end_with_a_newline_and_take_dumps_options(tmp_path):
    path = write_json_atomic(tmp_path / "state.json", {"b": 1, "a": 2}, sort_keys=True)
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
