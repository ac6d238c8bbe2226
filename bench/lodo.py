"""Datasets and folds of the generalization protocol (`bench/generalization.py`).

Every real dataset in `../shared/data` used for training or evaluation belongs to
exactly one fold. A fold's model is trained on the datasets of the other folds
(plus the simulated microscope) and evaluated only on its own: each dataset is
judged by a model that never saw it. Leaving a whole fold out is stricter than
leaving one dataset out (the model sees fewer datasets), and costs 3 trainings
instead of 17.

The brightfield T-cell movie is left out everywhere (not fluorescence; its noise
is not shot noise at a photon budget). The SMLM frames are not restoration data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: str  # "movie": a time-lapse; "image": good still images; "pair": real low/high
    files: tuple[str, ...]  # relative to DATA
    fold: int
    extra: dict[str, str] = field(default_factory=dict)

    def paths(self) -> list[Path]:
        return [DATA / f for f in self.files]


DATASETS: tuple[Dataset, ...] = (
    # fold 0
    Dataset("golgi_bfa", "movie", ("timelapse/golgi_bfa_xyt.tif",), 0),
    Dataset("drosophila_histone", "movie",
            ("timelapse/drosophila_syncytial_embryo_gfp_histone.tif",), 0),
    Dataset("intravital_platelets", "movie",
            ("timelapse/intravital_mesentery_platelets_leukocytes.tif",), 0,
            {"skip_channels": "2"}),  # C2 is nearly empty (the data's README)
    Dataset("bpae", "image", ("singles/BPAE_actin.tif", "singles/BPAE_mito.tif",
                              "singles/BPAE_nuclei.tif"), 0),
    Dataset("w2s", "pair", ("pairs/w2s/w2s_avg400_highsnr.tif",), 0,
            {"low": "pairs/w2s/w2s_avg1_lowsnr.tif"}),
    # fold 1
    Dataset("mitocheck_h2b", "movie", ("timelapse/mitocheck_h2b_xyt.tif",), 1),
    Dataset("frap_membrane", "movie", ("timelapse/frap_membrane_filopodia_embl.tif",), 1),
    Dataset("mesc_loci", "movie", ("timelapse/mesc_nuclei_teto_loci_hilo_mip.tif",), 1),
    Dataset("hela", "image", ("singles/hela-cells.tif",), 1),
    Dataset("neubias_tub_h2b", "image", ("singles/neubias_tub_h2b_cyx.tif",), 1),
    Dataset("gigadb", "pair", ("pairs/gigadb",), 1),
    # fold 2
    Dataset("cancer_migration", "movie", ("timelapse/cancer_migration_xyt.tif",), 2),
    Dataset("mitosis_2ch", "movie", ("timelapse/mitosis_2ch_mip_imagej_sample.tif",), 2),
    Dataset("membrane_5frames", "movie", ("timelapse/membrane_2d_timelapse_5frames.tif",), 2),
    Dataset("bbbc022_u2os", "image", ("singles/bbbc022_u2os_3ch.tif",), 2),
    Dataset("neubias_cell", "image", ("singles/neubias_cell_dna_mts_actin_cyx.tif",), 2),
    Dataset("fmd", "pair", ("pairs/fmd",), 2),
    Dataset("dna_confocal", "image", ("pairs/dna_confocal_zyx.tif",), 2),
)
FOLDS = (0, 1, 2)


def pair_files(ds: Dataset) -> list[tuple[Path, Path]]:
    """(low, high) files of a real pair dataset."""
    if "low" in ds.extra:
        return [(DATA / ds.extra["low"], DATA / ds.files[0])]
    folder = DATA / ds.files[0]
    out = []
    for low in sorted(folder.glob("*.tif")):
        for low_tag, high_tag in (("_low", "_high"), ("_raw", "_gt")):
            high = folder / low.name.replace(low_tag, high_tag)
            if low_tag in low.name and high.exists():
                out.append((low, high))
    return out


def training_sources(fold: int | None) -> tuple[list[Path], list[Path]]:
    """(good images, movies) for the model of `fold` (None: every dataset, the shipped model).

    Pairs contribute their high-SNR images only: the low images are what the fold
    evaluates on, and a model trained on crappified images never needs them.
    """
    images: list[Path] = []
    movies: list[Path] = []
    for ds in DATASETS:
        if fold is not None and ds.fold == fold:
            continue
        if ds.kind == "movie":
            movies += ds.paths()
        elif ds.kind == "image":
            images += ds.paths()
        else:
            images += [high for _, high in pair_files(ds)]
    return images, movies


def available() -> bool:
    return DATA.is_dir() and all(p.exists() for ds in DATASETS for p in ds.paths())
