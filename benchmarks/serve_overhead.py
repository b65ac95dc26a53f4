"""The web page's overhead: one generation through `ldm serve` in headless Chromium vs the same call in Python.

Same model (the embedded default), prompt, sampler, steps, guidance and image count (the page draws a random
seed each call, so that each result is a new file; the cost does not depend on the seed). Page time = from the
click on Generate until the result's <img> is visible (queue, upload of settings, PNG encode, download, render);
API time = `Pipeline.generate` in this process. The two alternate; medians of `--repeats` after one warm-up each.
The server is its own process on this machine, so on a busy machine both compete for the same cores.

    python benchmarks/serve_overhead.py [--repeats 5] [--steps 30] [--num-images 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.browser import chromium_path, launch_chromium, running_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--prompt", default="cat face")
    args = parser.parse_args()
    if chromium_path() is None:
        sys.exit("needs playwright and the system Chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from pipelines import Pipeline

    pipe = Pipeline()

    def api() -> float:
        start = time.perf_counter()
        pipe.generate(args.prompt, num_images=args.num_images, num_inference_steps=args.steps, seed=0,
                      progress=False)
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp) / "serve.log") as url, \
            sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        page.goto(url, wait_until="load")
        page.locator("#prompt textarea").fill(args.prompt)
        page.locator("#gen-steps input").fill(str(args.steps))
        page.locator("#gen-num input").fill(str(args.num_images))
        page.get_by_label("Random seed").first.check()  # a new image each call (same seed = same file, same src)
        newest = page.locator("#gallery img").first

        def shown(before: str | None) -> bool:
            """The gallery's first (newest) image is a new one, loaded and visible (counting images fails once the
            gallery is full: it keeps the last 32)."""
            return bool(newest.count() and newest.get_attribute("src") != before and newest.is_visible()
                        and newest.evaluate("img => img.complete && img.naturalWidth > 0"))

        def page_call() -> float:
            before = newest.get_attribute("src") if newest.count() else None
            start = time.perf_counter()
            page.locator("#generate").click()
            while not shown(before):
                if time.perf_counter() - start > 300:
                    sys.exit("the page gave no image in 300 s")
                time.sleep(0.01)
            return time.perf_counter() - start

        api(), page_call()  # warm-up: first-call costs on both sides
        times = {"api": [], "page": []}
        for _ in range(args.repeats):
            times["api"].append(api())
            times["page"].append(page_call())
        browser.close()
    api_s, page_s = statistics.median(times["api"]), statistics.median(times["page"])
    print(f"{args.num_images} image(s), {args.steps} steps, model's sampler, median of {args.repeats}")
    print("| path | s / request | overhead |")
    print("|---|---|---|")
    print(f"| Python API (`Pipeline.generate`) | {api_s:.2f} | - |")
    print(f"| page (`ldm serve` + Chromium) | {page_s:.2f} | +{page_s - api_s:.2f} s ({page_s / api_s - 1:+.0%}) |")


if __name__ == "__main__":
    main()
