"""Settings resolution: command line > CRYPTFS_* environment > TOML file > default."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptfs.config import OPTIONS, markdown_table, resolve
from cryptfs.errors import UsageError

DOCS = Path(__file__).resolve().parents[2] / "docs/CONFIGURATION.md"


def _file(tmp_path: Path, text: str) -> str:
    p = tmp_path / "vol.toml"
    p.write_text(text)
    return str(p)


def test_precedence_and_relative_paths(tmp_path: Path) -> None:
    conf = _file(
        tmp_path,
        'location = "s3://b/p"\nkey_file = "keys/k"\nwriteback_delay = 5\nmetadata_ttl = 7.5\n'
        'options = ["allow_other"]\nregion = "eu-west-1"\n',
    )
    env = {"CRYPTFS_WRITEBACK_DELAY": "3", "CRYPTFS_REGION": "us-west-2"}
    got = resolve({"region": "ap-south-1"}, conf, env)
    assert got["region"] == "ap-south-1"  # command line wins
    assert got["writeback_delay"] == 3.0  # environment beats the file
    assert got["metadata_ttl"] == 7.5  # the file beats the default
    assert got["key_file"] == tmp_path / "keys/k"  # relative to the file
    assert got["options"] == ["allow_other"]
    assert got["cache_dir"] is None and got["verbose"] == 0  # defaults
    assert resolve({}, None, {})["writeback_delay"] == 2.0


def test_bad_files_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"unknown key.*writeback_dealy"):
        resolve({}, _file(tmp_path, "writeback_dealy = 1\n"), {})
    with pytest.raises(UsageError, match="metadata_ttl must be a number"):
        resolve({}, _file(tmp_path, 'metadata_ttl = "soon"\n'), {})
    with pytest.raises(UsageError, match="options must be a list"):
        resolve({}, _file(tmp_path, "options = 3\n"), {})
    with pytest.raises(UsageError, match="writeback_delay must not be negative"):
        resolve({}, _file(tmp_path, "writeback_delay = -1\n"), {})
    with pytest.raises(UsageError, match="does not exist"):
        resolve({}, str(tmp_path / "missing.toml"), {})
    with pytest.raises(UsageError, match=r"vol\.toml"):
        resolve({}, _file(tmp_path, "location = \n"), {})  # not TOML


def test_systemd_credentials_supply_key_files(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("x")
    (tmp_path / "sse-c-key").write_text("y")
    got = resolve({}, None, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert got["key_file"] == tmp_path / "key"
    assert got["sse_c_key_file"] == tmp_path / "sse-c-key"
    # an explicit choice is never overridden
    got = resolve({"passphrase_file": Path("/p")}, None, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert got["key_file"] is None and got["passphrase_file"] == Path("/p")


def test_every_option_is_documented() -> None:
    text = DOCS.read_text()
    assert markdown_table() in text, "regenerate the table: python -m cryptfs.config"
    for o in OPTIONS:
        assert f"`{o.name}`" in text


def test_every_option_has_its_flag_on_mount() -> None:
    from cryptfs.cli import build_parser

    sample = {str: "x", float: "1.5", int: "3"}
    for o in OPTIONS:
        if o.name in ("location", "mountpoint", "options", "verbose"):
            continue
        value = [] if o.kind is bool else [sample.get(o.kind, "/some/path")]
        args = build_parser().parse_args(["mount", "s3://b/p", "/m", o.flag, *value])
        assert getattr(args, o.name) is not None, o.flag


def test_the_daemon_gets_every_setting_the_mount_resolved(tmp_path: Path) -> None:
    """The daemon's argv is made from the option table (it was written by hand, a third copy
    of every flag): whatever the command line, the environment or a file set, the daemon
    parses back the same values, 0 included (``--cache-size 0``: no disk cache)."""
    from cryptfs.cli import build_parser
    from cryptfs.config import daemon_argv, fs_options

    conf = tmp_path / "m.toml"
    conf.write_text('metrics_address = "127.0.0.1:9"\ns3ec_kms_key_id = ["a", "b"]\n')
    argv = ["mount", "s3://b/p", str(tmp_path / "m"), "--config", str(conf), "--cache-size",
            "0", "--read-ahead-kb", "0", "--show-s3ec", "--key-file", "k", "-o", "ro"]  # fmt: skip
    env = {"CRYPTFS_METADATA_TTL": "2.5"}
    first = build_parser().parse_args(argv)
    values = resolve({o.name: getattr(first, o.name, None) for o in OPTIONS}, first.config, env)
    again = build_parser().parse_args(["mount", "s3://b/p", "/m", *daemon_argv(values)])
    back = resolve({o.name: getattr(again, o.name, None) for o in OPTIONS}, None, {})
    skip = {"location", "mountpoint", "cache_dir", "log_file", "verbose", "options"}
    for o in OPTIONS:
        if o.name not in skip:
            want = values[o.name]
            if o.kind is Path and want is not None:
                want = Path(want).absolute()  # (the daemon runs in "/": absolute paths)
            assert back[o.name] == want, o.name
    assert values["cache_size"] == 0 and values["metadata_ttl"] == 2.5
    assert back["key_file"] == (Path("k").absolute())
    assert fs_options(values)["show_foreign"] is True
    from cryptfs.fs.model import Options

    Options(**fs_options(values))  # (every field the table names exists)
