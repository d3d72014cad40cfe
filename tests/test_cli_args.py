import pytest

from hwsearch.cli import main
from hwsearch.units import parse_quantity


@pytest.mark.parametrize(("argv", "needle"), [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "2.5"], "--epochs"),
    (["--search-epochs", "0"], "--search-epochs"),
    (["--fp32-epochs", "0"], "--fp32-epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-train", "0"], "--max-train"),
    (["--max-test", "-5"], "--max-test"),
    (["--seed", "-1"], "--seed"),
    (["--fp32-seed", "x"], "--fp32-seed"),
    (["--lr", "0"], "--lr"),
    (["--lr-fp32", "-0.1"], "--lr-fp32"),
    (["--lambda-w", "-1"], "--lambda-w"),
    (["--lambda-b", "nan"], "--lambda-b"),
    (["--lambda-c", "inf"], "--lambda-c"),
    (["--plan-lambda-w", "-2"], "--plan-lambda-w"),
    (["--init-bits", "0"], "--init-bits"),
    (["--b-min", "0"], "--b-min"),
    (["--b-max", "40"], "--b-max"),
    (["--act-bits", "three"], "--act-bits"),
    (["--bits", "0"], "--bits"),
    (["--first-last-bits", "-8"], "--first-last-bits"),
    (["--allocator", "greedy"], "--allocator"),
])
def test_run_refuses_every_bad_number_with_one_line(argv, needle, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--trials", "0"], ["--heartbeat", "0"], ["--grace", "-3"], ["--epochs", "0"]])
def test_search_refuses_bad_numbers(argv, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["search", "--out", str(out), *argv]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()


# Each budget's unit is its cost model's: BitOps (and cycles, ms) are counts with SI multipliers;
# memory is bytes, with decimal and binary prefixes, and bits converted.
@pytest.mark.parametrize(("text", "unit", "value"), [
    ("0.5G", "count", 5e8), ("300M", "count", 3e8), ("40M", "count", 4e7), ("1e9", "count", 1e9),
    ("12", "count", 12.0), ("300K", "count", 3e5), ("300k", "count", 3e5), ("2T", "count", 2e12),
    ("40KB", "bytes", 40_000.0), ("40kB", "bytes", 40_000.0), ("1.5MB", "bytes", 1.5e6), ("2GB", "bytes", 2e9),
    ("100KiB", "bytes", 102_400.0), ("1MiB", "bytes", 1_048_576.0), ("2GiB", "bytes", 2 * 2.0**30),
    ("40000", "bytes", 40_000.0), ("100B", "bytes", 100.0), ("40M", "bytes", 4e7),
    ("40Mb", "bytes", 5e6), ("8Kb", "bytes", 1000.0), ("8Kib", "bytes", 1024.0), ("16b", "bytes", 2.0),
])
def test_quantities_are_read_in_their_cost_models_unit(text, unit, value):
    assert parse_quantity(text, unit=unit) == pytest.approx(value)


@pytest.mark.parametrize(("text", "unit"), [
    ("40MB", "count"), ("40Mb", "count"), ("100KiB", "count"), ("5m", "count"), ("1.5X", "count"),
    ("abc", "count"), ("", "count"), ("-1", "count"), ("0", "count"), ("nan", "count"),
    ("40XB", "bytes"), ("40 MiBs", "bytes"), ("4Qi", "bytes"), ("1e3KiB?", "bytes"), ("0KB", "bytes"),
])
def test_quantities_in_the_wrong_unit_are_refused_naming_the_accepted_forms(text, unit):
    with pytest.raises(ValueError, match="expected|positive"):
        parse_quantity(text, what="--budget", unit=unit)


@pytest.mark.parametrize(("flag", "text", "accepted"), [
    ("--budget-bitops", "40MB", "SI multiplier"),
    ("--budget-memory", "100Kq", "KiB"),
    ("--budget-cost", "memory=1XB", "KiB"),
    ("--budget-cost", "bitfusion=2MB", "SI multiplier"),
    ("--budget-cost", "nosuch=2M", "unknown cost model"),
])
def test_cli_budgets_in_the_wrong_unit_name_the_accepted_forms(flag, text, accepted, tmp_path, capsys):
    assert main(["run", flag, text, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and accepted in err[0] and '"' not in err[0]
    assert not (tmp_path / "r").exists()
