import json

import pytest

from hwsearch.cli import main


def test_cost_json_totals(capsys):
    assert main(["cost", "--model", "resnet18", "--w-bits", "8", "--a-bits", "8", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"macs", "bitops", "bitops_fp32", "weight_bytes"} <= set(out["totals"])
    assert out["totals"]["bitops"] / 1e9 == pytest.approx(116, rel=0.02)
    assert len(out["layers"]) == 21


def test_cost_table_and_csv(capsys):
    assert main(["cost", "--model", "resnet20", "--w-bits", "4", "--a-bits", "4"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out
    # One style for every number: grouped integers, no scientific notation, whole cycles, units named.
    assert "e+" not in out and "670,081,024 BitOps" in out and "weighted by parameters" in out
    cycles = [line for line in out.splitlines() if line.strip().endswith(" cycles")]
    assert len(cycles) == 3 and all("." not in line for line in cycles)
    assert main(["cost", "--model", "resnet20", "--format", "csv", "--input-shape", "1,1,8,8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("name,op,macs") and len(lines) == 1 + 20  # 19 convs and the fc


@pytest.mark.parametrize(("argv", "needle"), [
    (["cost", "--model", "nope"], "resnet20"),
    (["cost", "--model", "resnet20", "--input-shape", "1,3,x"], "input shape"),
    (["cost", "--model", "resnet20", "--w-bits", "0"], "1..32"),
    (["cost", "--model", "resnet20", "--a-bits", "40"], "1..32"),
    (["cost", "--model", "no_such_pkg.mod:make"], "cannot import"),
    (["cost", "--model", "resnet20", "--input-shape", "1,3,2"], "failed to trace"),
])
def test_bad_input_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hwsearch: error:") and needle in err[0]
    assert "Traceback" not in captured.err
