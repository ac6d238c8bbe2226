"""Leave-one-fold-out generalization table for the denoiser (issue 10's protocol).

For each fold of `bench/lodo.py` the fold's model is compared on the fold's own
datasets — which it never saw — with the strongest classical method given the
same input. A fold's model is trained in two stages (`--train` runs the
commands it prints): on the simulated microscope alone (no real data, so one
run serves every fold), then fine-tuned on the real datasets of the OTHER
folds. The shipped model is made the same way, fine-tuned on all of them.

- time-lapses, degraded to 5, 20 and 100 photons at the brightest structure
  (Poisson shot noise, Gaussian read noise, gain, offset, ADC rounding; one
  camera that no training sample used exactly): the temporal model on the
  causal window of the last 5 frames vs BM4D+VST on the same window, and vs
  BM3D+VST on the frame alone; also the model given the frame alone;
- still images, degraded the same way: the model on the single frame vs BM3D+VST;
- real low/high pairs (real camera noise, 8-bit): model vs BM3D+VST, both with
  the noise model estimated from the low image.

Two model families (`--family`):
- `live` (default): the live temporal denoiser (`denoise`), trained in two stages.
- `hq`: the offline quality models (`denoise_hq`, `ModelCard.guide`): a network
  that refines BM3D+VST of the frame, trained from fixed pools of samples made
  per source file (`pool_files`, cached in bench/.cache/gen/pool, so each fold's
  pool is the union of its training sources' files). Still images and the
  "frame alone" column use the BM3D-guided model; time-lapses the BM4D-guided
  temporal model where one was trained (`--guides bm3d bm4d`), else the BM3D-guided
  network given BM4D's estimate over the same causal 5-frame window as its guide
  (`denoise_hq_t5`).

Every method gets the same noise model (the camera's calibration where the
degradation is ours). PSNR follows CSBDeep (affine fit to the normalised
truth). Per-image values, per-dataset means, the number of images won and the
worst image go to results/generalization.json and .md. Classical outputs are
cached in bench/.cache/gen (they do not depend on the model; BM4D takes ~4 s
per 5×128² window here), so rerunning after retraining only re-runs the models.

    python bench/generalization.py                 # table (models must exist)
    python bench/generalization.py --train         # train missing fold models first
    python bench/generalization.py --classical-only   # fill the classical cache
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lodo

from dimscope.engines import CameraCalibration, make_engine
from dimscope.engines.evaluation.quality import score
from dimscope.engines.noise_model import estimate_noise_model
from dimscope.engines.offline import calibration_for

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
MODELS = CACHE / "lodo"
CAMERA = CameraCalibration(gain_adu_per_e=1.3, offset_adu=250.0, read_noise_e=1.8)
BACKGROUND = 0.02  # of the brightest structure, as out-of-focus light
WINDOW = 5
BASE_STEPS = 8000
TRAIN_STEPS = 3000
#: stage 2 loss weight sigma^-W (train --noise-weight). 0: plain MSE. W = 1 was tried (fold 0,
#: intravital): no gain at 100 photons (-0.1 to -0.3 dB), 0.1-0.3 dB lost at 5 photons.
NOISE_WEIGHT = 0.0


def model_path(fold: int) -> Path:
    return MODELS / f"denoise_t5_fold{fold}.onnx"


# -- the offline quality family (guided) ------------------------------------------------------
POOL_DIR = CACHE / "gen" / "pool"
#: guide -> (samples per pool file, files per source): each file is made once and kept.
#: BM4D costs ~2 s per 5×96² sample here against BM3D's 0.3 s, hence the smaller pool.
POOLS = {"bm3d": (40, 3), "bm4d": (20, 1)}
HQ_STEPS = 3000
HQ_CHANNELS = 48


def hq_model_path(fold: int | None, guide: str) -> Path:
    return MODELS / f"denoise_hq_{guide}_{'all' if fold is None else f'fold{fold}'}.onnx"


def _hq_window(guide: str) -> int:
    return 1 if guide == "bm3d" else WINDOW


def pool_files(fold: int | None, guide: str, build: bool = True) -> list[Path]:
    """The pool files of `fold`'s training sources (made here when missing and `build`:
    seconds per sample), plus the simulated microscope's (twice as many)."""
    from dimscope.engines.training.clips import ClipSampler, movie_channels
    from dimscope.engines.training.guided import build_pool, save_pool
    from dimscope.engines.training.train import image_planes as training_planes

    images, movies = lodo.training_sources(fold)
    sources = ([("image", p) for p in images] + [("movie", p) for p in movies]
               + [("sim", None)])
    window = _hq_window(guide)
    size, chunks = POOLS[guide]
    files = []
    for kind, path in sources:
        stem = "sim" if path is None else path.stem
        for chunk in range(chunks * (2 if kind == "sim" else 1)):
            out = POOL_DIR / f"{guide}_w{window}_{stem}_{chunk}.npz"
            files.append(out)
            if out.exists() or not build:
                continue
            rng = np.random.default_rng(seed_of(guide, window, stem, chunk))
            clean_images = training_planes(path) if kind == "image" and path else []
            clean_movies = movie_channels(path) if kind == "movie" and path else []
            sampler = ClipSampler(window, 96, 1, clean_images, clean_movies, rng,
                                  sim_fraction=1.0 if kind == "sim" else 0.0)
            if kind != "sim" and not (sampler.images or sampler.movies):
                files.pop()  # nothing 96² in it
                break
            started = time.monotonic()
            inputs, targets = build_pool(sampler, size, guide, rng)  # type: ignore[arg-type]
            save_pool(out, inputs, targets, guide, window, str(path or "simulated"))  # type: ignore[arg-type]
            print(f"pool {out.name}: {len(inputs)} samples, {time.monotonic() - started:.0f} s",
                  flush=True)
    return files


def hq_train_command(fold: int | None, guide: str, steps: int = HQ_STEPS,
                     build: bool = True) -> list[str]:
    """The training command (its pools made first when `build`)."""
    out = hq_model_path(fold, guide)
    version = f"1-fold{fold}" if fold is not None else "1"
    return [str(ROOT / ".venv" / "bin" / "dimscope"), "train", "denoise", "--guide", guide,
            "--window", str(_hq_window(guide)), "--pool-files",
            *map(str, pool_files(fold, guide, build)), "--steps", str(steps), "--lr", "1e-3",
            "--batch", "16", "--channels", str(HQ_CHANNELS), "--levels", "3",
            "--val-every", "500", "--name", "denoise_hq", "--version", version,
            "--out", str(out), "--checkpoint", str(out.with_suffix(".ckpt")), "-q"]


BASE = MODELS / "denoise_t5_sim.onnx"


def base_command(steps: int = BASE_STEPS) -> list[str]:
    """Stage 1, shared by every fold: the simulated microscope only (no real dataset)."""
    return [str(ROOT / ".venv" / "bin" / "dimscope"), "train", "denoise", "--window",
            str(WINDOW), "--vst", "--steps", str(steps), "--batch", "16", "--patch", "96",
            "--val-every", "500", "--name", "denoise", "--version", "3-sim", "--out", str(BASE),
            "-q"]


def train_command(fold: int | None, out: Path, steps: int = TRAIN_STEPS) -> list[str]:
    """Stage 2: fine-tune the stage-1 model on the real datasets outside `fold` (None: all
    of them — the shipped model)."""
    images, movies = lodo.training_sources(fold)
    version = f"3-fold{fold}" if fold is not None else "3"
    return [str(ROOT / ".venv" / "bin" / "dimscope"), "train", "denoise", "--init", str(BASE),
            "--window", str(WINDOW), "--vst", "--data", *map(str, images), "--movies",
            *map(str, movies), "--sim-fraction", "0.3", "--noise-weight", str(NOISE_WEIGHT),
            "--steps", str(steps), "--lr", "1e-3",
            "--batch", "16", "--patch", "96", "--val-every", "500", "--name", "denoise",
            "--version", version, "--out", str(out), "--checkpoint",
            str(out.with_suffix(".ckpt")), "-q"]


# -- data -----------------------------------------------------------------------------------
def unit(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [0.1, 99.9])
    return np.clip((a.astype(np.float32) - lo) / max(float(hi - lo), 1e-6), 0.0, None)


def centre(a: np.ndarray, side: int) -> np.ndarray:
    h, w = a.shape[-2:]
    sh, sw = min(side, h), min(side, w)
    y0, x0 = (h - sh) // 2, (w - sw) // 2
    return a[..., y0:y0 + sh, x0:x0 + sw]


def movie_series(ds: lodo.Dataset, side: int) -> list[tuple[str, np.ndarray]]:
    data = np.asarray(tifffile.imread(ds.paths()[0]), dtype=np.float32)
    chans = [data] if data.ndim == 3 else [data[:, c] for c in range(data.shape[1])]
    skip = {int(c) for c in ds.extra.get("skip_channels", "").split(",") if c}
    return [(f"{ds.name}/c{c}", unit(centre(m, side))) for c, m in enumerate(chans)
            if c not in skip]


def image_planes(ds: lodo.Dataset, side: int, limit: int = 6) -> list[tuple[str, np.ndarray]]:
    out = []
    for path in ds.paths():
        data = np.asarray(tifffile.imread(path), dtype=np.float32)
        if data.ndim == 3 and data.shape[-1] in (3, 4) and data.shape[0] > 4:
            data = np.moveaxis(data, -1, 0)
        planes = data.reshape(-1, *data.shape[-2:])
        if len(planes) > limit:  # z-stacks: the planes with the most structure
            order = np.argsort([-float(np.std(centre(p, side))) for p in planes])
            planes = planes[np.sort(order[:limit])]
        for i, p in enumerate(planes):
            out.append((f"{ds.name}/{path.stem}/{i}", unit(centre(p, side))))
    return out[:limit]


def degrade(clean: np.ndarray, photons: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g, o, r = CAMERA.gain_adu_per_e, CAMERA.offset_adu, CAMERA.read_noise_e
    rel = clean + np.float32(BACKGROUND)
    e = rng.poisson(rel * photons).astype(np.float32) + rng.normal(0, r, rel.shape)
    return np.round(e * g + o).astype(np.float32), (rel * photons * g + o).astype(np.float32)


def seed_of(*parts: object) -> int:
    """A seed that is the same in every run (Python's hash() of a str is not)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


def psnr(truth: np.ndarray, x: np.ndarray) -> float:
    return round(score(truth, x, with_ssim=False)["psnr"], 3)


# -- methods --------------------------------------------------------------------------------
class Classical:
    """BM3D/BM4D results, cached by key (they never change with the model)."""

    def __init__(self) -> None:
        self.path = CACHE / "gen" / "classical.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.values: dict[str, float] = (json.loads(self.path.read_text())
                                         if self.path.exists() else {})
        self._dirty = 0

    def get(self, key: str, name: str, frames: list[np.ndarray], truth: np.ndarray,
            cal: CameraCalibration) -> float:
        full = f"{key}|{name}"
        if full not in self.values:
            engine = make_engine(name)
            engine.prepare(frames[-1].shape, np.dtype(np.float32), cal)
            for f in frames[:-1]:  # the causal window before the frame (BM4D)
                engine.process(f)
            self.values[full] = psnr(truth, engine.process(frames[-1]))
            self._dirty += 1
            if self._dirty % 5 == 0:
                self.save()
        return self.values[full]

    def save(self) -> None:
        # Merge with what another run may have added meanwhile (runs may share the cache).
        if self.path.exists():
            self.values = {**json.loads(self.path.read_text()), **self.values}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.values, indent=0, sort_keys=True))
        tmp.replace(self.path)


class Model:
    """A fold's model; `score` caches PSNRs by the model file's digest (slow hq models:
    an evaluation interrupted or split over runs does not redo what it did)."""

    CACHE_PATH = CACHE / "gen" / "model_scores.json"

    def __init__(self, path: Path, ensemble: bool = False, guide_window: int | None = None
                 ) -> None:
        from dimscope.engines.model_file import file_digest

        self.path, self.ensemble, self.guide_window = path, ensemble, guide_window
        self.tag = (f"{path.name}@{file_digest(path)}{'+ens' if ensemble else ''}"
                    f"{f'+g{guide_window}' if guide_window else ''}")
        self._cache: dict[str, float] = (json.loads(self.CACHE_PATH.read_text())
                                         if self.CACHE_PATH.exists() else {})

    def score(self, key: str, truth: np.ndarray, frames: list[np.ndarray],
              cal: CameraCalibration) -> float:
        full = f"{self.tag}|{key}|{len(frames)}"
        if full not in self._cache:
            self._cache[full] = psnr(truth, self.run(frames, cal))
            if self.CACHE_PATH.exists():  # merge what another run added meanwhile
                self._cache = {**json.loads(self.CACHE_PATH.read_text()), **self._cache}
            tmp = self.CACHE_PATH.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._cache, indent=0, sort_keys=True))
            tmp.replace(self.CACHE_PATH)
        return self._cache[full]

    def run(self, frames: list[np.ndarray], cal: CameraCalibration) -> np.ndarray:
        extra = {"guide_window": self.guide_window} if self.guide_window else {}
        engine = make_engine("model", model=str(self.path), runtime="openvino", precision="fp32",
                             ensemble=self.ensemble, **extra)
        engine.prepare(frames[-1].shape, np.dtype(np.float32), cal)
        for f in frames[:-1]:  # context only: nobody needs these outputs
            engine.observe(f)
        out = engine.process(frames[-1])
        engine.close()
        return out


# -- the table ------------------------------------------------------------------------------
def evaluate_fold(fold: int, photons: list[float], classical: Classical, model: Model | None,
                  side_movie: int, side_image: int, frames_per_movie: int,
                  single: Model | None = None) -> list[dict]:
    """Rows for `fold`'s datasets; `model` restores time-lapse frames from their causal
    window, `single` (default: `model`) restores still images and frames alone."""
    single = single if single is not None else model
    rows: list[dict] = []
    for ds in (d for d in lodo.DATASETS if d.fold == fold):
        if ds.kind == "movie":
            for name, movie in movie_series(ds, side_movie):
                ts = np.unique(np.linspace(min(WINDOW - 1, len(movie) - 1), len(movie) - 1,
                                           frames_per_movie).round().astype(int))
                for p in photons:
                    seed = seed_of(name, p)
                    noisy, truth = degrade(movie, p, seed)
                    for t in ts:
                        window = [noisy[i] for i in range(max(0, t - WINDOW + 1), t + 1)]
                        key = f"{name}@{side_movie}|t{t}|p{p:g}"
                        row = {"fold": fold, "dataset": ds.name, "kind": "movie", "image": name,
                               "t": int(t), "photons": p, "raw": psnr(truth[t], noisy[t]),
                               "bm3d": classical.get(key, "bm3d", window[-1:], truth[t], CAMERA),
                               "bm4d": classical.get(key, "bm4d", window, truth[t], CAMERA)}
                        if model is not None and single is not None:
                            row["model_single"] = single.score(key, truth[t], window[-1:],
                                                               CAMERA)
                            row["model"] = (row["model_single"] if model is single else
                                            model.score(key, truth[t], window, CAMERA))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        elif ds.kind == "image":
            for name, img in image_planes(ds, side_image):
                for p in photons:
                    noisy, truth = degrade(img, p, seed_of(name, p))
                    key = f"{name}@{side_image}|p{p:g}"
                    row = {"fold": fold, "dataset": ds.name, "kind": "image", "image": name,
                           "photons": p, "raw": psnr(truth, noisy),
                           "bm3d": classical.get(key, "bm3d", [noisy], truth, CAMERA)}
                    if single is not None:
                        row["model"] = single.score(key, truth, [noisy], CAMERA)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        else:  # real pairs: real noise, noise model estimated from the low image
            for low_path, high_path in lodo.pair_files(ds):
                low = np.asarray(tifffile.imread(low_path), dtype=np.float32)
                high = np.asarray(tifffile.imread(high_path), dtype=np.float32)
                if low.ndim == 3 and low.shape[-1] in (3, 4):
                    low, high = np.moveaxis(low, -1, 0), np.moveaxis(high, -1, 0)
                low, high = low.reshape(-1, *low.shape[-2:]), high.reshape(-1, *high.shape[-2:])
                picks = range(34, 40) if ds.name == "w2s" else range(len(low))
                for i in picks:
                    lo_img, hi_img = centre(low[i], side_image), centre(high[i], side_image)
                    cal = calibration_for(estimate_noise_model(lo_img))
                    name = f"{ds.name}/{low_path.stem}/{i}"
                    row = {"fold": fold, "dataset": ds.name, "kind": "real_pair", "image": name,
                           "photons": None, "raw": psnr(hi_img, lo_img),
                           "bm3d": classical.get(f"{name}@{side_image}", "bm3d", [lo_img],
                                                 hi_img, cal)}
                    if single is not None:
                        row["model"] = single.score(f"{name}@{side_image}", hi_img, [lo_img],
                                                    cal)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    classical.save()
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["fold"], r["dataset"], r["kind"], r["photons"]), []).append(r)
    out = []
    for (fold, ds, kind, p), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][2], kv[0][1], kv[0][3] or 0)):
        s: dict = {"fold": fold, "dataset": ds, "kind": kind, "photons": p, "n": len(rs)}
        for m in ("raw", "bm3d", "bm4d", "model_single", "model"):
            if m in rs[0]:
                s[m] = round(float(np.mean([r[m] for r in rs])), 2)
        if "model" in rs[0]:
            ref = "bm4d" if kind == "movie" else "bm3d"
            deltas = [r["model"] - r[ref] for r in rs]
            worst = int(np.argmin(deltas))
            s.update(reference=ref, margin=round(float(np.mean(deltas)), 2),
                     won=int(sum(d > 0 for d in deltas)),
                     worst_margin=round(float(deltas[worst]), 2),
                     worst_image=rs[worst]["image"] + (f" t{rs[worst]['t']}"
                                                       if "t" in rs[worst] else ""))
            if kind == "movie":
                s["margin_vs_bm3d"] = round(float(np.mean([r["model"] - r["bm3d"]
                                                           for r in rs])), 2)
        out.append(s)
    return out


def compact(summary: list[dict]) -> list[str]:
    """One row per dataset: model − reference (mean, and images won) at each light level."""
    by: dict[tuple[str, str], dict] = {}
    for s in summary:
        row = by.setdefault((s["kind"], s["dataset"]), {"fold": s["fold"], "ref": s.get(
            "reference", "—")})
        row[s["photons"]] = f"{s.get('margin', float('nan')):+.2f} ({s.get('won', 0)}/{s['n']})"
    levels = sorted({s["photons"] for s in summary if s["photons"] is not None})
    lines = ["| dataset (fold) | kind | vs | " + " | ".join(f"{p:g} photons" for p in levels)
             + " | real noise |", "|---|---|---|" + "---:|" * (len(levels) + 1)]
    for (kind, ds), row in sorted(by.items()):
        cells = [row.get(p, "") for p in levels] + [row.get(None, "")]
        lines.append(f"| {ds} ({row['fold']}) | {kind.replace('_', ' ')} | {row['ref']} | "
                     + " | ".join(cells) + " |")
    return lines


def markdown(summary: list[dict], meta: dict) -> str:
    family = meta.get("family", "live")
    which = ("the live denoiser (`denoise`)" if family == "live" else
             "the offline quality models (`denoise_hq`: a network refining BM3D+VST, "
             "guided)")
    lines = [f"# Generalization: leave-one-fold-out (`python bench/generalization.py "
             f"--family {family}`)", "", f"Model family: {which}.", "",
             f"{meta['protocol']}", "",
             f"Camera for the degraded data: gain {CAMERA.gain_adu_per_e} ADU/e⁻, offset "
             f"{CAMERA.offset_adu} ADU, read noise {CAMERA.read_noise_e} e⁻, background "
             f"{BACKGROUND} of the brightest structure; every method is given it. "
             f"Measured {meta['date']} on {meta['machine']}.", "",
             "PSNR in dB (CSBDeep: affine fit to the normalised truth), mean over the images; "
             "margin = model − reference per image (mean), won = images where the model is "
             "ahead, worst = the image with the smallest margin.", "",
             "Model − reference in dB, mean over the dataset's images (images won / images); "
             "the reference is BM4D+VST on the same causal 5-frame window for time-lapses, "
             "BM3D+VST for single images and real pairs:", "", *compact(summary), "",
             "In full:", "",
             "| fold | dataset | kind | photons | n | raw | BM3D | BM4D (5-frame causal) | "
             "model, frame alone | **model** | reference | **margin** | won | worst "
             "(image) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for s in summary:
        def f(k: str, s: dict = s) -> str:
            return f"{s[k]:.2f}" if k in s else "—"
        lines.append(
            f"| {s['fold']} | {s['dataset']} | {s['kind']} | "
            f"{s['photons'] if s['photons'] is not None else 'real'} | {s['n']} | {f('raw')} | "
            f"{f('bm3d')} | {f('bm4d')} | {f('model_single')} | **{f('model')}** | "
            f"{s.get('reference', '—')} | **{s.get('margin', float('nan')):+.2f}** | "
            f"{s.get('won', '—')}/{s['n']} | {s.get('worst_margin', float('nan')):+.2f} "
            f"({s.get('worst_image', '')}) |")
    return "\n".join(lines) + "\n"


def attach(model: Path, summary: list[dict], meta: dict) -> None:
    """Write the table into a model card (in the ONNX file and the JSON beside it)."""
    from dimscope.engines.model_file import read_card, write_card_metadata

    card = read_card(model)
    keep = ("fold", "dataset", "kind", "photons", "n", "raw", "bm3d", "bm4d", "model",
            "reference", "margin", "won", "worst_margin")
    evaluation = {"protocol": "bench/generalization.py: " + meta["protocol"],
                  "date": meta["date"], "camera": meta["camera"],
                  "note": "fold models made by the same recipe as this model; each dataset "
                          "scored by the model that never saw it",
                  "table": [{k: s[k] for k in keep if k in s} for s in summary]}
    write_card_metadata(model, card.model_copy(update={"evaluation": evaluation}))
    print(f"wrote the table into the card of {model}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folds", type=int, nargs="*", default=list(lodo.FOLDS))
    ap.add_argument("--photons", type=float, nargs="*", default=[5.0, 20.0, 100.0])
    ap.add_argument("--train", action="store_true", help="train missing fold models first")
    ap.add_argument("--classical-only", action="store_true")
    ap.add_argument("--frames-per-movie", type=int, default=3)
    ap.add_argument("--side-movie", type=int, default=128)
    ap.add_argument("--side-image", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None,
                    help="default results/generalization (live), results/generalization_hq")
    ap.add_argument("--family", choices=["live", "hq"], default="live",
                    help="live: the live temporal denoiser; hq: the offline quality models "
                         "(guided by BM3D/BM4D)")
    ap.add_argument("--guides", nargs="*", choices=["bm3d", "bm4d"], default=["bm3d"],
                    help="hq: the guided models to train/evaluate (bm4d: temporal)")
    ap.add_argument("--card", type=Path, default=None,
                    help="copy the table into this model file's card (the shipped model made "
                         "by the same recipe: engines/models/denoise.onnx)")
    args = ap.parse_args()
    if not lodo.available():
        print(f"SKIP: the real data ({lodo.DATA}) is not here")
        return 0
    classical = Classical()
    rows: list[dict] = []
    for fold in args.folds:
        model = None
        if args.family == "hq" and not args.classical_only:
            paths = {g: hq_model_path(fold, g) for g in args.guides}
            for g, path in paths.items():
                if not path.exists():
                    cmd = hq_train_command(fold, g, build=args.train)
                    print("fold model missing; train it with (its pools are made by "
                          "--train):\n  " + " ".join(cmd))
                    if not args.train:
                        return 1
                    subprocess.run(cmd, check=True)
            models = {g: Model(p, ensemble=True) for g, p in paths.items()}
            if "bm3d" not in models:
                print("--family hq needs the bm3d-guided model (stills, frames alone)")
                return 2
            temporal = models.get("bm4d") or Model(paths["bm3d"], ensemble=True,
                                                   guide_window=WINDOW)
            rows += evaluate_fold(fold, args.photons, classical, temporal, args.side_movie,
                                  args.side_image, args.frames_per_movie, models["bm3d"])
            continue
        if not args.classical_only:
            path = model_path(fold)
            if not path.exists():
                cmds = ([] if BASE.exists() else [base_command()]) + [train_command(fold, path)]
                print("fold model missing; train it with:\n  "
                      + "\n  ".join(" ".join(c) for c in cmds))
                if not args.train:
                    return 1
                for cmd in cmds:
                    subprocess.run(cmd, check=True)
            model = Model(path)
        rows += evaluate_fold(fold, args.photons, classical, model, args.side_movie,
                              args.side_image, args.frames_per_movie)
    if args.classical_only:
        return 0
    if args.out is None:
        args.out = ROOT / "results" / ("generalization" if args.family == "live"
                                       else "generalization_hq")
    summary = summarise(rows)
    import platform

    meta = {"protocol": lodo.__doc__.strip().split("\n\n")[1].replace("\n", " "),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
                       "CPU cores, OpenVINO FP32",
            "camera": {"gain": CAMERA.gain_adu_per_e, "offset": CAMERA.offset_adu,
                       "read_noise": CAMERA.read_noise_e, "background": BACKGROUND},
            "family": args.family,
            "models": {f: str(model_path(f).relative_to(ROOT)) if args.family == "live" else
                       [str(hq_model_path(f, g).relative_to(ROOT)) for g in args.guides]
                       for f in args.folds}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    if args.card is not None:
        attach(args.card, summary, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
