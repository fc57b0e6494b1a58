"""Label budgets (MLPE_BUDGETS): the file, every malformed line named, which jobs a budget
covers; job labels checked."""

import pytest

from mlpe.common.jobs import resolve
from mlpe.control.budgets import BudgetError, LabelBudget, load
from mlpe.v1 import control_pb2 as c

GOOD = """budgets:
  - label: team=vision
    amount: 1000
    policy: pause
    since: 2026-12-01
  - {label: project/llm=run-7, amount: 12.5}
"""


def test_a_budgets_file_and_what_each_budget_covers(tmp_path):
    path = tmp_path / "budgets.yaml"
    path.write_text(GOOD)
    vision, llm = load(path)
    assert (vision.label, vision.amount, vision.policy) == ("team=vision", 1000.0, "pause")
    assert vision.since_ns == 1_796_083_200 * 10**9  # 2026-12-01T00:00Z
    assert (llm.label, llm.amount, llm.policy, llm.since_ns) == \
        ("project/llm=run-7", 12.5, "warn", 0)

    def job(labels, submitted_ns=vision.since_ns):
        return {"resolved": {"labels": labels}, "submitted_ns": submitted_ns}

    assert vision.covers(job({"team": "vision", "x": "y"}))
    assert not vision.covers(job({"team": "vision"}, vision.since_ns - 1))  # before since
    assert not vision.covers(job({"team": "speech"})) and not vision.covers(job({}))
    assert LabelBudget("a", "b", 1, "warn", 0).covers({"resolved": {}, "submitted_ns": 0}) \
        is False
    (tmp_path / "empty.yaml").write_text("")
    assert load(tmp_path / "empty.yaml") == []


@pytest.mark.parametrize("text, line, says", [
    ("budgets: nope\n", 1, "expected `budgets:` and a list"),
    ("limits: []\n", 1, "expected `budgets:`"),
    ("budgets:\n  - {amount: 5}\n", 2, "label is missing"),
    ("budgets:\n  - {label: team, amount: 5}\n", 2, "label must be key=value"),
    ("budgets:\n  - {label: 'a b=c', amount: 5}\n", 2, "label must be key=value"),
    ("budgets:\n  - label: t=v\n    amount: lots\n", 3, "amount must be a number above 0"),
    ("budgets:\n  - {label: t=v, amount: 0}\n", 2, "amount must be a number above 0"),
    ("budgets:\n  - {label: t=v, amount: .nan}\n", 2, "amount must be a number above 0"),
    ("budgets:\n  - {label: t=v, amount: 5, policy: explode}\n", 2,
     "policy must be one of pause, stop, warn"),
    ("budgets:\n  - {label: t=v, amount: 5, since: yesterday}\n", 2, "since must be a date"),
    ("budgets:\n  - {label: t=v, amount: 5, per: month}\n", 2, "unknown key 'per'"),
    ("budgets:\n  - {label: t=v, amount: 5}\n  - {label: t=v, amount: 6}\n", 3,
     "t=v has two budgets"),
    ("budgets: [\n", 2, "not YAML"),
])
def test_a_malformed_budgets_file_names_the_line(tmp_path, text, line, says):
    path = tmp_path / "budgets.yaml"
    path.write_text(text)
    with pytest.raises(BudgetError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and says in str(err.value)


def test_an_unreadable_budgets_file_is_named(tmp_path):
    with pytest.raises(BudgetError, match="cannot read the budgets file"):
        load(tmp_path / "missing.yaml")


def test_job_labels_are_checked():
    spec = c.JobSpec(entrypoint=c.Entrypoint(script="/x.py"),
                     labels={"team": "vision", "bad key": "v", "k": "-v"})
    _, problems = resolve(spec)
    assert [p for p in problems if p.startswith("labels:")] == [
        "labels: 'bad key': 'v': keys and values are 1-63 letters, digits and ._/- starting "
        "and ending with a letter or digit",
        "labels: 'k': '-v': keys and values are 1-63 letters, digits and ._/- starting and "
        "ending with a letter or digit"]
    ok, problems = resolve(c.JobSpec(entrypoint=c.Entrypoint(script="/x.py"),
                                     labels={"team": "vision"}))
    assert ok["labels"] == {"team": "vision"} and not [p for p in problems if "labels" in p]
