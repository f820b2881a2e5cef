"""End to end in a real browser: JupyterLab + headless Chromium run the quickstart and click Approve.

    python -m pytest tests/test_browser.py -m browser -q -s

What a person does on a fresh machine, automated: start JupyterLab (127.0.0.1, a free
port, a token, a temp root holding a copy of notebooks/01_quickstart.ipynb), open the
notebook, Run > Run All Cells, wait for the panel's proposal, click Approve, and check
what they would see: the highlighted diff, a live loss-curve image, the outcome with
keep/discard buttons; then check the lab's ledger on disk gained the experiment.
A screenshot of the panel is saved under test-output/ (and, with
AUTORESEARCH_UPDATE_SCREENSHOT=1, copied to docs/img/panel.png for the README).

Needs /usr/bin/chromium (Debian's; CI installs it). Never downloads Playwright's own browser build.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import tiny_train_source

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
OUTPUT = ROOT / "test-output"

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_user_settings(settings_dir: Path) -> None:
    """Start the notebook's kernel without asking, and no news prompt over the panel."""
    files = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"autoStartDefaultKernel": True},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                             "checkForUpdates": False},
    }
    for rel, value in files.items():
        path = settings_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


class JupyterLab:
    """A JupyterLab server on 127.0.0.1 in its own process group, stopped on exit."""

    def __init__(self, root: Path, env: dict, log: Path) -> None:
        self.port, self.token = _free_port(), os.urandom(16).hex()
        # Private config/runtime/workspace dirs: no user settings, no restored layout.
        home = root.parent / "jupyter-home"
        for sub in ("config", "data", "runtime", "workspaces"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        _write_user_settings(home / "config" / "lab" / "user-settings")
        env = {**env, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
               "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTER_PLATFORM_DIRS": "1"}
        cmd = [sys.executable, "-m", "jupyterlab", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               "--ServerApp.open_browser=False", f"--ServerApp.root_dir={root}",
               f"--LabApp.workspaces_dir={home / 'workspaces'}", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready(log)

    def _wait_ready(self, log: Path, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"JupyterLab exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}"
                raise RuntimeError(msg)
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        msg = f"JupyterLab did not answer within {timeout:.0f}s:\n{log.read_text()[-3000:]}"
        raise RuntimeError(msg)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)
        self.log.close()


def run_all_cells(page) -> None:
    """Run > Run All Cells, via the menu labels (stable across JupyterLab 4 releases)."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def _kernel_idle(server: JupyterLab) -> bool:
    url = f"{server.url}/api/sessions?token={server.token}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            sessions = json.loads(r.read())
    except OSError:
        return False
    return any(s.get("kernel", {}).get("execution_state") == "idle" for s in sessions)


def open_notebook(page, server: JupyterLab, name: str, timeout_s: float = 90.0) -> None:
    """Open a notebook and return once its kernel is started and the page knows it is idle."""
    page.goto(f"{server.url}/lab/tree/{name}?token={server.token}", wait_until="domcontentloaded")
    page.locator(".jp-Notebook").first.wait_for(timeout=timeout_s * 1000)
    deadline = time.monotonic() + timeout_s
    while not _kernel_idle(server):
        if time.monotonic() > deadline:
            msg = f"the kernel for {name} did not start within {timeout_s:.0f}s"
            raise TimeoutError(msg)
        time.sleep(0.5)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(
        state="attached", timeout=timeout_s * 1000)


def _tiny_train(path: Path) -> Path:
    """The real train.py with one narrow block (conftest's knobs): every code path, seconds per run."""
    path.write_text(tiny_train_source())
    return path


def _output_dir(tmp_path: Path) -> Path:
    """test-output/ in the repo (CI keeps it as an artifact), else the test's tmp_path."""
    try:
        OUTPUT.mkdir(exist_ok=True)
        return OUTPUT
    except OSError:
        return tmp_path


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_quickstart_in_jupyterlab_approve_in_the_panel(tmp_path):
    from playwright.sync_api import sync_playwright

    from autoresearch_kit.ledger import Ledger

    # For the README's screenshot, a budget long enough for the curves to have a shape.
    update_screenshot = bool(os.environ.get("AUTORESEARCH_UPDATE_SCREENSHOT"))
    budget = "40k-tokens" if update_screenshot else "2000-tokens"
    root = tmp_path / "nb"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / "01_quickstart.ipynb", root / "01_quickstart.ipynb")
    lab_dir = root / "labs" / "quickstart"
    env = {k: v for k, v in os.environ.items() if k != "AUTORESEARCH_DATA"}
    env.update({"AUTORESEARCH_CACHE": str(tmp_path / "cache"), "AUTORESEARCH_DEVICE": "cpu",
                "AUTORESEARCH_EVAL_TOKENS": "4096", "AUTORESEARCH_NOTEBOOK_BUDGET": budget,
                "AUTORESEARCH_NOTEBOOK_TRAIN": str(_tiny_train(tmp_path / "tiny_train.py")),
                "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    out = _output_dir(tmp_path)
    server = JupyterLab(root, env, tmp_path / "jupyterlab.log")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            try:
                open_notebook(page, server, "01_quickstart.ipynb")
                run_all_cells(page)
                panel = page.locator(".ark-panel").first
                approve = panel.locator("button:has-text('Approve'):not([disabled])")
                # baseline + one step by hand run first; then the panel shows the next proposal
                approve.wait_for(timeout=240_000)
                diff = panel.locator(".ark-diff")
                assert diff.is_visible() and "train.py" in diff.inner_text()
                assert panel.locator(".ark-diff td").count() > 3       # hunk rows rendered
                with Ledger(lab_dir, readonly=True) as led:
                    before = len(led.records())
                assert before == 2                                    # baseline + the hand step

                # no card is wider than the panel (a 2 px side margin on 100%-wide widgets made a
                # 4 px horizontal scrollbar under the proposal card)
                wide = panel.evaluate("p => [...p.querySelectorAll('.ark-card')]"
                                      ".map(c => c.scrollWidth - c.clientWidth).filter(d => d > 0)")
                assert wide == [], f"cards overflow sideways by {wide} px"
                # the editor: its description label is not clipped, and the edit's diff shows above it
                panel.locator("button[title='Edit train.py yourself, then run it']").click()
                label = panel.locator("label.widget-label", has_text="description")
                label.wait_for(timeout=10_000)
                assert label.evaluate("l => l.clientWidth > 0 && l.scrollWidth <= l.clientWidth"), "label clipped"
                edit_diff = panel.locator(".ark-editor-diff .ark-diff")
                edit_diff.wait_for(timeout=10_000)
                assert edit_diff.is_visible() and panel.locator(".ark-editor-diff .ark-diff td").count() > 3
                panel.locator("button[title='Back to the proposal']").click()
                approve.wait_for(timeout=10_000)

                # the tab goes to the background: the run's end shows in its title
                page.evaluate("() => Object.defineProperty(document, 'hidden', {configurable: true, get: () => true})")
                approve.click()
                keep = panel.locator("button:has-text('Keep'), button:has-text('Discard')")
                panel.locator("button:has-text('Discard'):not([disabled])").wait_for(timeout=180_000)
                page.wait_for_function("() => document.title.startsWith('\u2713 experiment')", timeout=15_000)
                assert "val_bpb" in page.title()
                assert keep.count() >= 2
                # the live loss curve: an <img> the widget filled with a PNG of real size
                curve = panel.locator(".widget-image img, img.widget-image").first
                curve.wait_for(timeout=10_000)
                width = curve.evaluate("img => img.naturalWidth")
                assert width > 300
                assert "val_bpb" in panel.inner_text() and "vs parent" in panel.inner_text()
                page.set_viewport_size({"width": 1280, "height": 2600})   # the whole panel in one shot
                time.sleep(1.0)
                shot = out / "panel.png"
                panel.screenshot(path=str(shot))
            except Exception:
                page.screenshot(path=str(out / "browser-failure.png"), full_page=True)
                raise
            finally:
                browser.close()
    finally:
        server.stop()
    with Ledger(lab_dir, readonly=True) as led:
        recs = led.records()
    assert len(recs) == 3 and recs[-1]["kind"] == "candidate" and recs[-1]["status"] == "ok"
    assert len(recs[-1]["curve"]) >= 1
    assert shot.stat().st_size > 20_000
    if update_screenshot:
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "img" / "panel.png")
