"""The MLflow UI as a user opens it, in headless Chromium (`make ui-check`).

    python scripts/ui/check.py [--out docs/ui] [--store FOLDER] [--chromium /usr/bin/chromium]

Builds a small store (`store.py`: two xor fits, a moons fit, a 2-point sweep), starts
`mlflow ui` on it, and walks the runs table, a fit's run page, its logged model, the compare
view of the sweep's children and the sweep parent, asserting on each what a user must see and
writing a screenshot of each to `--out`. The store's own checks (`store.problems`, also run in
CI without a browser) come first.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
import store  # noqa: E402

# without the background-networking flags Chromium keeps dialling Google on a closed network
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update",
         "--disable-sync"]  # fmt: skip


class Failed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(uri: str, folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise Failed(f"mlflow ui did not answer at {url} within a minute")


class Pages:
    """One browser page, a screenshot per view, and assertions on what the view shows."""

    def __init__(self, page, url: str, out: Path, folder: Path) -> None:
        self.page, self.url, self.out, self.store = page, url, out, folder
        self.seen: list[str] = []

    def open(self, route: str, shot: str, wait_for: str) -> str:
        self.page.goto(f"{self.url}/#{route}")
        try:
            self.page.get_by_text(wait_for, exact=False).first.wait_for(timeout=30_000)
        except Exception:
            self.page.screenshot(path=str(self.out / f"{shot}.png"), full_page=True)
            raise Failed(f"{shot}: {wait_for!r} not shown at #{route}") from None
        self.page.wait_for_timeout(2000)  # the UI polls: never network-idle; let charts draw
        close_assistant(self.page)
        self.page.screenshot(path=str(self.out / f"{shot}.png"), full_page=True)
        self.seen.append(shot)
        return self.page.inner_text("body")

    def expect(self, shot: str, text: str, *wanted: str, absent: tuple = ()) -> None:
        missing = [w for w in wanted if w not in text]
        present = [a for a in absent if a in text]
        if missing or present:
            raise Failed(f"{shot}: missing {missing}" if missing else f"{shot}: shows {present}")


def close_assistant(page) -> None:
    """MLflow 3's Assistant panel opens over the page on a first visit: closed if shown."""
    for label in ("Close assistant", "Close"):
        button = page.get_by_role("button", name=label)
        if button.count() and button.first.is_visible():
            button.first.click()
            return


def walk(pages: Pages, uri: str) -> None:
    import mlflow

    client = mlflow.MlflowClient(uri)
    every = store.runs(client)
    parent = next(r for r in every if "mlplab.best_child_name" in r.data.tags)
    children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    fit = next(r for r in every if r.info.run_name.startswith("moons"))
    experiment = fit.info.experiment_id
    output = fit.outputs.model_outputs[0]

    pages.page.goto(pages.url)  # the UI's two faces: its runs are under "Model training"
    pages.page.get_by_text("Model training").first.click()
    # xor's runs: two fits and the sweep parent, its children folded under it
    xor = parent.info.experiment_id
    top = [r.info.run_name for r in every
           if r.info.experiment_id == xor and "mlflow.parentRunId" not in r.data.tags]  # fmt: skip
    text = pages.open(f"/experiments/{xor}/runs", "1-runs-table", parent.info.run_name)
    pages.expect("1-runs-table", text, *top)

    run = f"/experiments/{experiment}/runs/{fit.info.run_id}"
    text = pages.open(run, "2-run-page", fit.info.run_name)
    commit = fit.data.tags["mlflow.source.git.commit"]
    pages.expect("2-run-page", text, commit[:7], "model")

    # the run page links its logged model; that link must open the model's page
    link = pages.page.locator(f"a[href*='{output.model_id}']").first
    if not link.count():
        raise Failed("2-run-page: no link to the run's logged model")
    route = link.get_attribute("href").split("#", 1)[-1]
    text = pages.open(route, "3-logged-model", "test/acc")
    pages.expect("3-logged-model", text, "test/acc", store.split_dataset(fit, "test"), "Ready")

    ids = quote(json.dumps([c.info.run_id for c in children]))
    experiment = parent.info.experiment_id
    text = pages.open(f"/compare-runs?runs={ids}&experiments={quote(json.dumps([experiment]))}",
                      "4-compare-sweep", children[0].info.run_name)  # fmt: skip
    params = text.split("\nParameters\n", 1)[-1].split("\nMetrics\n", 1)[0]  # its table
    pages.expect("4-compare-sweep", params, "model.lr",
                 absent=(*store.BOOKKEEPING, str(pages.store)))  # fmt: skip

    route = f"/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    text = pages.open(route, "5-sweep-parent", parent.info.run_name)
    pages.expect("5-sweep-parent", text, parent.data.tags["mlplab.best_child_name"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/ui/check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=store.ROOT / "docs" / "ui")
    parser.add_argument("--store", type=Path, help="the store's folder, built there unless it "
                        "holds one (default: a temporary folder)")  # fmt: skip
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("mlplab: playwright is not installed; run `make ui-check`", file=sys.stderr)
        return 2
    if not Path(args.chromium).is_file():
        print(f"mlplab: no Chromium at {args.chromium}; `apt-get install chromium` or give "
              "--chromium PATH", file=sys.stderr)  # fmt: skip
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.store or Path(tmp)
        if (folder / "mlflow.db").is_file():
            uri = store.store_uri(folder)
        else:
            print(f"ui-check: building a store in {folder} (about a minute)")
            uri = store.build(folder)
        found = store.problems(uri)
        if found:
            print("\n".join(found), file=sys.stderr)
            return 1
        server, url = serve(uri, folder)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=FLAGS)
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                pages = Pages(page, url, args.out, folder)
                try:
                    walk(pages, uri)
                except Failed as failure:
                    print(f"ui-check: {failure}", file=sys.stderr)
                    return 1
                finally:
                    browser.close()
        finally:
            server.terminate()
            server.wait()
    print(f"ui-check: {len(pages.seen)} pages as asserted; screenshots in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
