"""Row reading for `musefast batch`: every input format, defaults, and bad rows as errors."""
import json

import pytest

from musefast.batch.rows import Row, RowError, default_seed, read_rows

PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle"]


def _write_all(tmp_path):
    """The same three rows (second one with every optional field) in each format."""
    extra = {"id": "b", "seed": 7, "negative_prompt": "red", "num_steps": 4, "guidance_scale": 2.5}
    dicts = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], **extra}, {"prompt": PROMPTS[2]}]
    paths = {}
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dicts))
    paths["jsonl"] = tmp_path / "p.jsonl"
    header = "id,prompt,seed,negative_prompt,num_steps,guidance_scale,url\n"
    (tmp_path / "p.csv").write_text(header + f",{PROMPTS[0]},,,,,x\nb,{PROMPTS[1]},7,red,4,2.5,y\n,{PROMPTS[2]},,,,,z\n")
    paths["csv"] = tmp_path / "p.csv"
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    columns = {k: [d.get(k) for d in dicts] for k in ("id", "prompt", "seed", "negative_prompt", "num_steps",
                                                       "guidance_scale")}
    pq.write_table(pa.table(columns), tmp_path / "p.parquet")
    paths["parquet"] = tmp_path / "p.parquet"
    return dicts, paths


def test_every_format_reads_the_same_rows(tmp_path):
    dicts, paths = _write_all(tmp_path)
    expected = read_rows(dicts, global_seed=3)
    assert expected[1] == Row("b", PROMPTS[1], 7, "red", 4, 2.5, 2)
    assert expected[0] == Row("1", PROMPTS[0], default_seed("1", 3), None, None, None, 1)
    for fmt, path in paths.items():
        assert read_rows(path, global_seed=3) == expected, fmt


def test_txt_ids_are_line_numbers_and_seeds_do_not_depend_on_other_rows(tmp_path):
    (tmp_path / "a.txt").write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    rows = read_rows(tmp_path / "a.txt")
    assert [(r.id, r.prompt) for r in rows] == [("1", PROMPTS[0]), ("3", PROMPTS[1])]
    (tmp_path / "b.txt").write_text(f"other\n\n{PROMPTS[1]}\nmore\n")
    assert read_rows(tmp_path / "b.txt")[1].seed == rows[1].seed  # same id, same global seed
    assert read_rows(tmp_path / "a.txt", global_seed=1)[1].seed != rows[1].seed
    assert len({r.seed for r in read_rows([f"p{i}" for i in range(500)])}) == 500


@pytest.mark.parametrize("record, message", [
    ({"prompt": ""}, "prompt must be a non-empty string"),
    ({"prompt": "x", "num_steps": 0}, "num_steps must be an int"),
    ({"prompt": "x", "num_steps": "many"}, "num_steps must be an int"),
    ({"prompt": "x", "guidance_scale": "nan"}, "guidance_scale must be a finite number"),
    ({"prompt": "x", "seed": -1}, "seed must be an int"),
    ({"prompt": "x", "id": "../evil"}, "names a file"),
    ({"prompt": "x", "negative_prompt": 3}, "negative_prompt must be a string"),
])
def test_bad_rows_become_errors(record, message):
    (out,) = read_rows([record])
    assert isinstance(out, RowError) and message in out.error and out.line == 1


def test_bad_jsonl_line_is_a_row_error_and_bad_files_are_errors(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\nnot json\n[1]\n')
    rows = read_rows(tmp_path / "p.jsonl")
    assert isinstance(rows[0], Row) and "not valid JSON" in rows[1].error and "JSON object" in rows[2].error
    (tmp_path / "p.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="'prompt' column"):
        read_rows(tmp_path / "p.csv")
    (tmp_path / "p.tsv").write_text("prompt\nhello\n")
    with pytest.raises(ValueError, match="must be one of"):
        read_rows(tmp_path / "p.tsv")
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "missing.txt")
