"""Prompt loader against the pinned copies in ../shared/data (copied into tmp_path, never the repo; those
tests skip without it), and user prompt files refused in one line when they hold no readable prompts."""

import hashlib
import shutil
from pathlib import Path

import pytest

from bitflux_cli import prompts
from bitflux_cli.errors import UsageError
from bitflux_cli.prompts import PromptDataError, PromptSetError, load_prompts

DATA = (Path(__file__).parents[1] / "../shared/data").resolve()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"prompt data not found at {DATA}: needs the shared/data checkout beside the repo")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Keep the user's cache out of the tests and fail loudly on any real download."""
    monkeypatch.setenv("BITFLUX_CACHE", str(tmp_path / "cache"))

    def refuse(url):
        raise AssertionError(f"test tried to fetch {url}")

    monkeypatch.setattr(prompts, "_fetch", refuse)


def copy_data(dest: Path, rels) -> Path:
    for rel in rels:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DATA / rel, dest / rel)
    return dest


@needs_data
def test_paper_counts():
    ps = load_prompts(["paper"], DATA)
    assert ps.counts["sets"] == {"paper": 7232}
    assert ps.counts["files"]["parti/PartiPrompts.tsv"] == 1632
    train = {k: v for k, v in ps.counts["files"].items() if k.startswith("t2i_compbench/")}
    assert len(train) == 8 and set(train.values()) == {700}
    assert (ps.counts["total"], ps.counts["distinct"], ps.counts["duplicates"]) == (7232, 7190, 42)
    assert ps.counts["empty_lines"] == 0
    assert len(ps.prompts) == ps.counts["selected"] == 7232
    assert len(set(ps.prompts)) == 7190
    assert ps.prompts[:1632] == load_prompts(["parti"], DATA).prompts
    assert ps.prompts[1632:] == load_prompts(["t2i_compbench_train"], DATA).prompts


@needs_data
def test_dedupe_keeps_first_occurrence():
    full = load_prompts(["paper"], DATA).prompts
    ps = load_prompts(["paper"], DATA, dedupe=True)
    assert ps.prompts == list(dict.fromkeys(full))
    assert len(ps.prompts) == ps.counts["selected"] == 7190 and ps.counts["total"] == 7232
    # "three chairs" is in Parti and in numeracy_train: the Parti one (earlier) is kept.
    assert ps.prompts.index("three chairs") < 1632


@needs_data
def test_other_sets():
    assert len(load_prompts(["t2i_compbench_val"], DATA).prompts) == 2400
    geneval = load_prompts(["geneval"], DATA)
    assert len(geneval.prompts) == 553
    # The list hash is that of a one-prompt-a-line file: generation_prompts.txt itself.
    assert geneval.sha256 == prompts.FILES["geneval/generation_prompts.txt"][1]


@needs_data
def test_text_is_read_exactly():
    ps = load_prompts(["paper"], DATA).prompts
    giggle = [p for p in ps if p.startswith('"G I G G L E" painted in')]
    assert len(giggle) == 1
    assert any("piñata" in p for p in ps) and any("café" in p for p in ps)
    assert all(p == p.strip() and "\r" not in p and "\t" not in p and p for p in ps)


def test_unknown_set_lists_known_ones():
    with pytest.raises(PromptSetError, match="unknown prompt set 'partii', and no such file: known sets are .*parti.*t2i_compbench_train"):
        load_prompts(["partii"], DATA)


def test_user_file_set(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_bytes("\ufeffa red cube\r\n\r\n  a café  \r\na red cube".encode("utf-8"))
    ps = load_prompts([str(path)])
    assert ps.prompts == ["a red cube", "a café", "a red cube"]
    assert ps.counts["empty_lines"] == 1 and ps.counts["duplicates"] == 1
    assert load_prompts([str(path)], dedupe=True).prompts == ["a red cube", "a café"]


@needs_data
def test_tampered_file_is_refused(tmp_path):
    rel = "t2i_compbench/color_train.txt"
    copy_data(tmp_path, [rel])
    data = bytearray((tmp_path / rel).read_bytes())
    data[10] ^= 0x20
    (tmp_path / rel).write_bytes(bytes(data))
    with pytest.raises(PromptDataError, match=f"sha256 mismatch for .*color_train.txt: expected {prompts.FILES[rel][1]}, got [0-9a-f]{{64}}"):
        load_prompts(["t2i_compbench_train"], tmp_path)


def test_missing_file_in_data_dir(tmp_path):
    with pytest.raises(PromptDataError, match="parti/PartiPrompts.tsv not found in data_dir"):
        load_prompts(["parti"], tmp_path)


@needs_data
def test_seeded_subset():
    full = load_prompts(["paper"], DATA).prompts
    a = load_prompts(["paper"], DATA, limit=100, seed=3)
    assert a.prompts == load_prompts(["paper"], DATA, limit=100, seed=3).prompts
    assert a.sha256 == load_prompts(["paper"], DATA, limit=100, seed=3).sha256
    assert len(a.prompts) == a.counts["selected"] == 100 and a.counts["total"] == 7232
    assert a.prompts != load_prompts(["paper"], DATA, limit=100, seed=4).prompts
    positions = [full.index(p) for p in a.prompts]  # subset keeps the original order
    assert positions == sorted(positions)
    assert len(load_prompts(["geneval"], DATA, limit=10_000).prompts) == 553
    with pytest.raises(ValueError, match="limit"):
        load_prompts(["paper"], DATA, limit=0)


@needs_data
def test_download_through_file_url(monkeypatch, tmp_path):
    monkeypatch.undo()  # the real urllib fetch, pointed at file:// copies
    cache = tmp_path / "cache"
    monkeypatch.setenv("BITFLUX_CACHE", str(cache))
    rel = "parti/PartiPrompts.tsv"
    monkeypatch.setitem(prompts.FILES, rel, ((DATA / rel).as_uri(), prompts.FILES[rel][1]))
    ps = load_prompts(["parti"])
    assert len(ps.prompts) == 1632
    assert hashlib.sha256((cache / rel).read_bytes()).hexdigest() == prompts.FILES[rel][1]
    assert [p.name for p in (cache / "parti").iterdir()] == ["PartiPrompts.tsv"]  # no temp left

    def refuse(url):
        raise AssertionError("downloaded twice")

    monkeypatch.setattr(prompts, "_fetch", refuse)
    assert load_prompts(["parti"]).prompts == ps.prompts


@needs_data
def test_downloaded_bytes_are_verified(monkeypatch, tmp_path):
    rel = "geneval/generation_prompts.txt"
    monkeypatch.setattr(prompts, "_fetch", lambda url: (DATA / rel).read_bytes() + b"extra\n")
    with pytest.raises(PromptDataError, match="sha256 mismatch for geneval/generation_prompts.txt downloaded from https://"):
        load_prompts(["geneval"])
    assert not (tmp_path / "cache" / rel).exists()


def test_offline_without_local_copy(monkeypatch, tmp_path):
    monkeypatch.undo()
    monkeypatch.setenv("BITFLUX_CACHE", str(tmp_path / "cache"))
    rel = "geneval/generation_prompts.txt"
    monkeypatch.setitem(prompts.FILES, rel, ((tmp_path / "absent.txt").as_uri(), prompts.FILES[rel][1]))
    with pytest.raises(PromptDataError) as err:
        load_prompts(["geneval"])
    message = str(err.value)
    assert "\n" not in message and "calibration.prompts.data_dir" in message
    assert str(tmp_path / "cache" / rel) in message


def test_mini_set_is_balanced_training_captions():
    from bitflux_cli.miniworld.world import CATEGORIES, prompts as world_prompts

    ps = load_prompts(["mini"])
    assert ps.counts["total"] == 384 and ps.counts["distinct"] == 91
    train = {s.caption for c in CATEGORIES for s in world_prompts(c, "train")}
    held_out = {s.caption for c in CATEGORIES if c != "single_object" for s in world_prompts(c, "test")}
    assert set(ps.prompts) == train and not set(ps.prompts) & held_out
    assert load_prompts(["mini"], limit=32, seed=1).prompts == load_prompts(["mini"], limit=32, seed=1).prompts


@pytest.mark.parametrize("content, expected", [
    (b"", r"holds no prompts \(0 empty lines\)"),
    (b"\r\n  \n\t\n", r"holds no prompts \(3 empty lines\)"),
    (b"\xef\xbb\xbf\n", "holds no prompts"),
    (b"a red cube\n\xff\xfeblue", r"is not UTF-8 text \(byte 0xff at offset 11\): save it as UTF-8"),
    ("a café".encode("latin-1"), r"is not UTF-8 text \(byte 0xe9 at offset 5\)"),
    ("a red cube".encode("utf-16"), r"is not UTF-8 text \(byte 0xff at offset 0\)"),
    (b"\xef\xbb\xbfa\x80", r"byte 0x80 at offset 4"),
    (b"PK\x03\x04\x00\x00", r"holds a NUL byte \(offset 4\): a binary file"),
])
def test_unusable_user_file_is_one_line_usage_error(tmp_path, content, expected):
    path = tmp_path / "mine.txt"
    path.write_bytes(content)
    with pytest.raises(PromptSetError, match=expected) as err:
        load_prompts([str(path)])
    assert isinstance(err.value, UsageError) and err.value.exit_code == 2
    assert "\n" not in str(err.value) and repr(str(path)) in str(err.value)


def test_missing_directory_and_device_are_refused(tmp_path):
    with pytest.raises(PromptSetError, match="unknown prompt set .*absent.txt', and no such file"):
        load_prompts([str(tmp_path / "absent.txt")])
    with pytest.raises(PromptSetError, match="is a directory: give a text file"):
        load_prompts([str(tmp_path)])
    with pytest.raises(PromptSetError, match="is not a regular file"):
        load_prompts(["/dev/zero"])  # would never end
    with pytest.raises(PromptSetError, match="no prompt sets given"):
        load_prompts([])
    with pytest.raises(PromptSetError, match="limit must be a positive number"):
        load_prompts(["mini"], limit=0)


def test_crlf_bom_and_blank_lines_are_prompts_not_errors(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_bytes("\ufeff\r\nun chat\r\n\r\n  ein Hund\t\r\n".encode("utf-8"))
    ps = load_prompts([str(path)])
    assert ps.prompts == ["un chat", "ein Hund"] and ps.counts["empty_lines"] == 2
