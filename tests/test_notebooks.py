"""The three notebooks run top to bottom, headless (nbclient), offline, with tiny budgets.

    python -m pytest tests/test_notebooks.py -x -q

Each notebook reads its settings from the environment, as CI sets them:
AUTORESEARCH_NOTEBOOK_BUDGET (a 2000-token budget), AUTORESEARCH_NOTEBOOK_LAB (a temp
lab directory) and AUTORESEARCH_NOTEBOOK_TRAIN (the real train.py shrunk to one narrow
block, so a run takes seconds). The built-in corpus is prepared for real, once, into a
private cache. The checks are what a reader would look at: no error, the diff and the
curves rendered, the decisions recorded in the lab's ledger.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import tiny_train_source

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BUDGET = "2000-tokens"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

def write_tiny_train(path: Path) -> Path:
    """The real train.py with one narrow block (conftest's knobs): every code path, seconds per run."""
    path.write_text(tiny_train_source())
    return path


@pytest.fixture(scope="module")
def nb_env(tmp_path_factory):
    """Environment for the notebook kernels: private cache, CPU, tiny eval, tiny train.py."""
    root = tmp_path_factory.mktemp("nbenv")
    env = {"AUTORESEARCH_CACHE": str(root / "cache"), "AUTORESEARCH_DEVICE": "cpu",
           "AUTORESEARCH_EVAL_TOKENS": "4096", "AUTORESEARCH_NOTEBOOK_BUDGET": BUDGET,
           "AUTORESEARCH_NOTEBOOK_TRAIN": str(write_tiny_train(root / "tiny_train.py")),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    return env


def execute(name: str, cwd: Path, env: dict, monkeypatch, timeout: int = 300):
    """Run a notebook in a fresh kernel (which inherits `env`); return the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AUTORESEARCH_DATA", raising=False)   # the notebooks prepare their own
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def text_of(nb) -> str:
    parts = []
    for o in outputs(nb):
        parts.append(o.get("text", ""))
        data = o.get("data", {})
        parts.append(data.get("text/html", ""))
        parts.append(data.get("text/plain", ""))
    return "\n".join(p if isinstance(p, str) else "".join(p) for p in parts)


def test_notebooks_are_committed_without_outputs():
    import nbformat

    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip the outputs"
        settings = nb.cells[1].source
        assert "AUTORESEARCH_NOTEBOOK_BUDGET" in settings, path.name
        # the loop's notebooks use the lab's default budget (a CPU lab calibrates); the walkthrough 60 s
        default = '"60s"' if path.name.startswith("02") else "or None"
        assert default in settings, path.name


def test_quickstart(nb_env, tmp_path, monkeypatch):
    from autoresearch_kit.ledger import Ledger

    lab_dir = tmp_path / "lab"
    nb = execute("01_quickstart.ipynb", tmp_path, {**nb_env, "AUTORESEARCH_NOTEBOOK_LAB": str(lab_dir)}, monkeypatch)
    text = text_of(nb)
    assert "ark-diff" in text and "train.py" in text           # the proposal's diff rendered
    assert "data:image/png;base64" in text                      # a run's curve rendered
    widgets = [o for o in outputs(nb) if WIDGET_VIEW in o.get("data", {})]
    assert len(widgets) >= 3                                    # two live curves and the panel
    assert "rule:" in text
    with Ledger(lab_dir, readonly=True) as led:
        recs = led.records()
    assert [r["kind"] for r in recs[:2]] == ["baseline", "candidate"]
    assert recs[0]["status"] == recs[1]["status"] == "ok"
    assert recs[1]["decision"] in ("keep", "discard") and recs[1]["decided_by"] == "human"
    assert recs[1]["decision_reason"] == "quickstart: following the rule"
    assert len(recs[1]["curve"]) >= 1
    assert "re-run this cell" in text                          # the line that outlives a page reload

    # after a kernel restart, re-running only the panel cell works (it used to be NameError: lab)
    import nbformat

    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "lab.panel()" in c.source]
    solo = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell.source)])
    solo.metadata = nb.metadata
    path = tmp_path / "solo.ipynb"
    nbformat.write(solo, path)
    monkeypatch.setattr("test_notebooks.NOTEBOOKS", tmp_path)
    out = execute("solo.ipynb", tmp_path, {**nb_env, "AUTORESEARCH_NOTEBOOK_LAB": str(lab_dir)}, monkeypatch)
    assert [o for o in outputs(out) if WIDGET_VIEW in o.get("data", {})], "the panel did not display"
    assert not [o for o in outputs(out) if o.get("output_type") == "error"]


def test_walkthrough(nb_env, tmp_path, monkeypatch):
    from autoresearch_kit.ledger import Ledger

    lab_dir = tmp_path / "lab"
    nb = execute("02_walkthrough.ipynb", tmp_path, {**nb_env, "AUTORESEARCH_NOTEBOOK_LAB": str(lab_dir)}, monkeypatch)
    text = text_of(nb)
    assert "bigram probe:  {'causal': True" in text and "peeker probe:  {'causal': False" in text
    assert "WARMDOWN_FRAC" in text and "ark-diff" in text
    m = re.search(r"untrained: ([0-9.]+) bpb; after \d+ steps \(train loss [0-9.]+\): ([0-9.]+) bpb", text)
    assert m, "the evaluate_bpb cell did not print its before/after line"
    assert float(m.group(2)) < float(m.group(1))                # 150 steps of training help
    # fixed steps, not seconds: on any machine the trained bigram beats the unigram baseline and
    # the peeking model is "too good to be true" next to it (issue 13 saw 2.78 and 2.49 vs 2.25)
    unigram = float(re.search(r"unigram \(frequencies\) ([0-9.]+) bpb", text).group(1))
    peek = float(re.search(r"peeking model: ([0-9.]+) bpb after 100 steps", text).group(1))
    assert float(m.group(2)) < unigram and peek < float(m.group(2)) - 0.5
    assert "sampled before training: '" in text and "sampled after training:  '" in text
    assert re.search(r"noise: sigma [0-9.]+ bpb; the candidate's gain [-+][0-9.]+ is [-+][0-9.]+ sigma", text)
    figures = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert len(figures) >= 2                                    # the LR schedules, baseline and candidate
    with Ledger(lab_dir, readonly=True) as led:
        recs = led.records()
    assert recs[1]["description"] == "warm-down over 60% of the budget instead of 40%"
    assert recs[1]["proposer"] == "replay" and recs[1]["decision"] in ("keep", "discard")


def test_analysis_creates_a_lab_when_absent(nb_env, tmp_path, monkeypatch):
    lab_dir = tmp_path / "lab"
    nb = execute("03_analysis.ipynb", tmp_path, {**nb_env, "AUTORESEARCH_NOTEBOOK_LAB": str(lab_dir)}, monkeypatch)
    text = text_of(nb)
    assert f"no lab at {lab_dir}" in text
    assert "minutes of runs in total" in text
    rows = (lab_dir / "results.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"] and len(rows) == 4
    figures = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert figures, "the progress plot did not render"
    # a second run reads the same lab without creating anything
    nb = execute("03_analysis.ipynb", tmp_path, {**nb_env, "AUTORESEARCH_NOTEBOOK_LAB": str(lab_dir)}, monkeypatch)
    assert "no lab at" not in text_of(nb) and len((lab_dir / "results.tsv").read_text().splitlines()) == 4
