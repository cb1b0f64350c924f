"""Print bench/results.jsonl as the Markdown tables of docs/quality.md."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("path", nargs="?", default=str(ROOT / "bench" / "results.jsonl"))
    ap.add_argument("--model", help="only rows whose model contains this")
    ap.add_argument("--mode", help="only direct or pipeline rows")
    a = ap.parse_args()
    rows = [json.loads(line) for line in Path(a.path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "superseded" not in r.get("note", "")]  # kept in the file, not in the tables
    rows = [r for r in rows if (not a.model or a.model in r["model"])
            and (not a.mode or r.get("mode", "direct") == a.mode)]
    print("| model | mode | precision | crops | gallery | R@1 | R@5 | R@10 | mAP@10 | command |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        det = r.get("detect", "none")
        det = "none" if det == "none" else "yolov8n"
        gallery = r.get("gallery_set") or ("iconic" if "iconic" in r["command"] else "train")
        gallery = {"train": "train photos (2640)", "iconic": "iconic (81)"}.get(gallery, gallery)
        if "error" in r:
            nums = "weights not available offline | | | "
            if "WeightsUnavailable" not in r["error"] and "no weights" not in r["error"]:
                nums = f"error: {r['error'][:80]} | | | "
        else:
            nums = " | ".join(f"{r[k]:.3f}" for k in ("recall@1", "recall@5", "recall@10", "map@10"))
        print(f"| {r['model']} | {r.get('mode', 'direct')} | {r['precision']} | {det} | {gallery} | {nums} | "
              f"`{short(r['command'])}` |")


def short(command: str) -> str:
    """The command as one would type it: repo-relative model dir, $DET for the detector file."""
    command = command.replace(str(ROOT.parent / "shared" / "models" / "yolov8n-coco" / "yolov8n_int8.tflite"), "$DET")
    return command.replace(str(ROOT) + "/", "")


if __name__ == "__main__":
    main()
