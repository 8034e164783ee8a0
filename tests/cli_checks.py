"""Checks shared by the tests that drive the CLI: a file's hash, the one-line user error, the
arguments of a quiet prune."""

from __future__ import annotations

import hashlib


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(result, *words):
    """A user error: exit code 2, one line on stderr starting 'error:', naming each of `words`,
    and no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err and "\n" not in err, err
    assert "Traceback" not in result.stderr + result.stdout
    assert err.startswith("error:")
    for w in words:
        assert w in err, (w, err)
    return err


def prune_args(model, out, *extra):
    return ["prune", model, "-o", out, "--quiet", *extra]
