"""Bad input, tried systematically: every class of malformed input against the readers, the CLI and the
served model, counting what each does.

Method: each input class below builds a malformed input in a fresh sandbox folder (seeded random
bytes, truncations, crafted headers, hostile paths...) and hands it to its target (the manifest
reader, the image/mask readers, `bonemet validate`, `bonemet predict`, the served classifier's
``predict``). An outcome is:

* ``user_error``: a :class:`bonemet.errors.UserError` (one line for a user; for the served model an
  MLflow 400), or a command exiting 1/2 with one line on stderr and no traceback;
* ``ok``: the input was accepted (classes marked ``may_pass``: e.g. a BOM CSV, a 4D image with one
  time point, quoted commas);
* ``traceback``: any other exception, or a command printing a traceback: a defect;
* ``wrote_outside``: any file created outside the target's own output folder: a defect.

Goal (issue 18): at least 30 classes, 0 tracebacks, 0 writes outside the outputs.

    python benchmarks/fuzz.py [--quick] [--examples N] [--json PATH]

``--quick`` tries one example per class (seconds; CI runs it); the default tries 5 (random
classes draw new bytes each time). Results: ``benchmarks/results/fuzz.json``, summary in
``benchmarks/fuzz.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
GOOD_HEADER = "case_id,label,image,mask\n"


@dataclass(frozen=True)
class InputClass:
    name: str
    target: str
    build: Callable[[np.random.Generator, Path], Callable[[], object]]
    may_pass: bool = False


CLASSES: list[InputClass] = []


def input_class(target: str, may_pass: bool = False):
    def register(fn):
        CLASSES.append(InputClass(fn.__name__.removeprefix("c_").replace("_", " "), target, fn, may_pass))
        return fn
    return register


# --- helpers -------------------------------------------------------------------------------------

def _ct(folder: Path, name: str = "ct.nii.gz", shape=(12, 16, 16), dtype=np.int16, value=None) -> Path:
    arr = (np.random.default_rng(0).normal(0, 300, shape)).astype(dtype) if value is None else \
        np.full(shape, value, dtype=dtype)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.8, 0.8, 2.0))
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _cohort(folder: Path, manifest_bytes: bytes, with_files: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if with_files:
        _ct(folder, "images/a.nii.gz")
        _ct(folder, "masks/a.nii.gz", dtype=np.uint8, value=1)
    (folder / "manifest.csv").write_bytes(manifest_bytes)
    return folder


def _read_manifest(folder: Path):
    from bonemet.data.manifest import read_manifest

    return lambda: read_manifest(folder)


def _read_image(path: Path):
    from bonemet.data.io import read_image

    return lambda: read_image(path, case_id="fuzz")


# --- the manifest reader -------------------------------------------------------------------------

@input_class("manifest")
def c_random_bytes_manifest(rng, tmp):
    return _read_manifest(_cohort(tmp, rng.bytes(int(rng.integers(1, 4000)))))


@input_class("manifest")
def c_empty_manifest(rng, tmp):
    return _read_manifest(_cohort(tmp, b""))


@input_class("manifest")
def c_header_only_manifest(rng, tmp):
    return _read_manifest(_cohort(tmp, GOOD_HEADER.encode()))


@input_class("manifest", may_pass=True)
def c_bom_utf8_manifest(rng, tmp):
    return _read_manifest(_cohort(tmp, b"\xef\xbb\xbf" + (GOOD_HEADER + "a,1,images/a.nii.gz,masks/a.nii.gz\n").encode()))


@input_class("manifest")
def c_latin1_manifest(rng, tmp):
    text = GOOD_HEADER.replace("\n", ",note\n") + "a,1,images/a.nii.gz,masks/a.nii.gz,M\xfcller\n"
    return _read_manifest(_cohort(tmp, text.encode("latin-1")))


@input_class("manifest")
def c_utf16_manifest(rng, tmp):
    return _read_manifest(_cohort(tmp, (GOOD_HEADER + "a,1,images/a.nii.gz,masks/a.nii.gz\n").encode("utf-16")))


@input_class("manifest", may_pass=True)
def c_quoted_commas(rng, tmp):
    text = 'case_id,label,image,mask,note\na,1,images/a.nii.gz,masks/a.nii.gz,"lytic, T12, ""large"""\n'
    return _read_manifest(_cohort(tmp, text.encode()))


@input_class("manifest")
def c_duplicate_columns(rng, tmp):
    return _read_manifest(_cohort(tmp, b"case_id,label,image,mask,label\na,1,images/a.nii.gz,masks/a.nii.gz,0\n"))


@input_class("manifest")
def c_missing_column(rng, tmp):
    return _read_manifest(_cohort(tmp, b"case_id,image,mask\na,images/a.nii.gz,masks/a.nii.gz\n"))


@input_class("manifest")
def c_very_long_id(rng, tmp):
    cid = "a" * int(rng.integers(65, 5000))
    return _read_manifest(_cohort(tmp, f"{GOOD_HEADER}{cid},1,images/a.nii.gz,masks/a.nii.gz\n".encode()))


@input_class("manifest")
def c_id_with_path_characters(rng, tmp):
    cid = rng.choice(["../../escape", "a/b", "..", ".hidden", "a b", "x\\y", "-rf"])
    return _read_manifest(_cohort(tmp, f"{GOOD_HEADER}{cid},1,images/a.nii.gz,masks/a.nii.gz\n".encode()))


@input_class("manifest")
def c_absolute_image_path(rng, tmp):
    outside = _ct(tmp / "outside")
    return _read_manifest(_cohort(tmp / "cohort", f"{GOOD_HEADER}a,1,{outside},masks/a.nii.gz\n".encode()))


@input_class("manifest")
def c_dotdot_path(rng, tmp):
    _ct(tmp / "outside")
    return _read_manifest(_cohort(tmp / "cohort", f"{GOOD_HEADER}a,1,../outside/ct.nii.gz,masks/a.nii.gz\n".encode()))


@input_class("manifest")
def c_symlink_leading_out(rng, tmp):
    outside = _ct(tmp / "outside")
    cohort = _cohort(tmp / "cohort", f"{GOOD_HEADER}a,1,images/link.nii.gz,masks/a.nii.gz\n".encode())
    (cohort / "images" / "link.nii.gz").symlink_to(outside)
    return _read_manifest(cohort)


@input_class("manifest")
def c_bad_labels(rng, tmp):
    label = rng.choice(["2", "yes", "", "1.0", "-1", "breast"])
    return _read_manifest(_cohort(tmp, f"{GOOD_HEADER}a,{label},images/a.nii.gz,masks/a.nii.gz\n".encode()))


@input_class("manifest")
def c_duplicate_ids(rng, tmp):
    return _read_manifest(_cohort(tmp, (GOOD_HEADER + "a,1,images/a.nii.gz,masks/a.nii.gz\n" * 2).encode()))


@input_class("manifest")
def c_nul_bytes(rng, tmp):
    return _read_manifest(_cohort(tmp, (GOOD_HEADER + "a\x00b,1,images/a.nii.gz,masks/a.nii.gz\n").encode()))


@input_class("manifest", may_pass=True)
def c_crlf_and_spaces(rng, tmp):
    return _read_manifest(_cohort(tmp, b" case_id , label ,image,mask\r\n a ,1, images/a.nii.gz ,masks/a.nii.gz\r\n"))


@input_class("manifest")
def c_ragged_rows(rng, tmp):
    return _read_manifest(_cohort(tmp, (GOOD_HEADER + "a,1,images/a.nii.gz\nb,0,x,y,z,w\n").encode()))


# --- the image and mask readers ------------------------------------------------------------------

@input_class("image")
def c_random_bytes_nifti(rng, tmp):
    path = tmp / "x.nii.gz"
    path.write_bytes(rng.bytes(int(rng.integers(1, 20000))))
    return _read_image(path)


@input_class("image")
def c_random_bytes_gzip_nifti(rng, tmp):
    path = tmp / "x.nii.gz"
    path.write_bytes(gzip.compress(rng.bytes(int(rng.integers(1, 20000)))))
    return _read_image(path)


@input_class("image")
def c_random_bytes_nrrd(rng, tmp):
    path = tmp / "x.nrrd"
    path.write_bytes(b"NRRD0004\n" + rng.bytes(int(rng.integers(1, 5000))))
    return _read_image(path)


@input_class("image")
def c_truncated_gzip_nifti(rng, tmp):
    data = _ct(tmp).read_bytes()
    path = tmp / "cut.nii.gz"
    path.write_bytes(data[: int(rng.integers(10, len(data) - 1))])
    return _read_image(path)


@input_class("image")
def c_truncated_raw_nifti(rng, tmp):
    data = _ct(tmp, "ct.nii").read_bytes()
    path = tmp / "cut.nii"
    path.write_bytes(data[: int(rng.integers(352, len(data) - 1))])
    return _read_image(path)


@input_class("image")
def c_nan_voxels(rng, tmp):
    arr = np.zeros((8, 8, 8), np.float32)
    arr[tuple(rng.integers(0, 8, 3))] = np.nan
    image = sitk.GetImageFromArray(arr)
    sitk.WriteImage(image, str(tmp / "nan.mha"))  # MetaImage keeps NaN (ITK's NIfTI writer does not)
    return _read_image(tmp / "nan.mha")


@input_class("image")
def c_inf_voxels(rng, tmp):
    arr = np.zeros((8, 8, 8), np.float64)
    arr[0, 0, 0] = rng.choice([np.inf, -np.inf])
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp / "inf.nrrd"))
    return _read_image(tmp / "inf.nrrd")


@input_class("image")
def c_2d_image(rng, tmp):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.int16)), str(tmp / "flat.nii.gz"))
    return _read_image(tmp / "flat.nii.gz")


@input_class("image")
def c_4d_image(rng, tmp):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 6, 8, 8), np.int16)), str(tmp / "t.nii.gz"))
    return _read_image(tmp / "t.nii.gz")


@input_class("image", may_pass=True)
def c_4d_image_one_time_point(rng, tmp):
    path = _ct(tmp, "ct.nii")
    data = bytearray(path.read_bytes())
    dims = struct.unpack_from("<8h", data, 40)
    struct.pack_into("<8h", data, 40, 4, dims[1], dims[2], dims[3], 1, 1, 1, 1)  # dim[0] = 4, one time point
    path.write_bytes(bytes(data))
    return _read_image(path)


@input_class("image")
def c_vector_image(rng, tmp):
    image = sitk.GetImageFromArray(np.zeros((6, 8, 8, 3), np.uint8), isVector=True)
    sitk.WriteImage(image, str(tmp / "rgb.nrrd"))
    return _read_image(tmp / "rgb.nrrd")


@input_class("image")
def c_absurd_header_dimensions(rng, tmp):
    path = _ct(tmp, "ct.nii")
    data = bytearray(path.read_bytes())
    huge = int(rng.choice([30000, 32767]))
    struct.pack_into("<8h", data, 40, 3, huge, huge, huge, 1, 1, 1, 1)  # NIfTI-1 dim[0..7]
    path.write_bytes(bytes(data))
    return _read_image(path)


@input_class("image", may_pass=True)  # ITK then takes the spacing from the sform: the geometry survives
def c_zero_spacing(rng, tmp):
    path = _ct(tmp, "ct.nii")
    data = bytearray(path.read_bytes())
    struct.pack_into("<4f", data, 76, 1.0, 0.0, 0.0, 0.0)  # NIfTI-1 pixdim[0..3]
    path.write_bytes(bytes(data))
    return _read_image(path)


@input_class("image")
def c_empty_folder(rng, tmp):
    (tmp / "series").mkdir()
    return _read_image(tmp / "series")


@input_class("image")
def c_folder_of_non_dicom(rng, tmp):
    (tmp / "series").mkdir()
    for i in range(3):
        (tmp / "series" / f"{i}.dcm").write_bytes(rng.bytes(200))
    return _read_image(tmp / "series")


@input_class("image")
def c_unknown_suffix(rng, tmp):
    (tmp / "ct.txt").write_bytes(rng.bytes(100))
    return _read_image(tmp / "ct.txt")


@input_class("mask")
def c_non_integer_mask(rng, tmp):
    from bonemet.data.io import read_mask

    arr = np.full((8, 8, 8), 0.5, np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp / "m.nii.gz"))
    return lambda: read_mask(tmp / "m.nii.gz", label=1, case_id="fuzz")


@input_class("mask")
def c_random_bytes_dicom_mask(rng, tmp):
    from bonemet.data.dicom_masks import read_lesion_mask
    from bonemet.data.io import read_image

    ct = read_image(_ct(tmp))
    (tmp / "m.dcm").write_bytes(b"\x00" * 128 + b"DICM" + rng.bytes(int(rng.integers(0, 3000))))
    return lambda: read_lesion_mask(tmp / "m.dcm", ct, label=1, roi="lesion", seg_segment=None, case_id="fuzz",
                                    grid_tolerance_mm=0.01)


@input_class("mask")
def c_mask_on_another_grid(rng, tmp):
    from bonemet.data.dicom_masks import read_lesion_mask
    from bonemet.data.io import read_image

    ct = read_image(_ct(tmp))
    _ct(tmp, "m.nii.gz", shape=(10, 16, 16), dtype=np.uint8, value=1)
    return lambda: read_lesion_mask(tmp / "m.nii.gz", ct, label=1, roi=None, seg_segment=None, case_id="fuzz",
                                    grid_tolerance_mm=0.01)


# --- the command line ----------------------------------------------------------------------------

def _command(args: list[str], cwd: Path):
    def call():
        proc = subprocess.run([sys.executable, "-m", "bonemet", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, PYTHONUTF8="1"))
        return proc
    return call


@input_class("cli")
def c_validate_hostile_cohort(rng, tmp):
    _ct(tmp / "outside")
    cohort = _cohort(tmp / "cohort", (GOOD_HEADER + "../../x,1,../outside/ct.nii.gz,/etc/passwd\n").encode())
    return _command(["validate", str(cohort), "--params", str(REPO / "params.yaml")], tmp)


@input_class("cli")
def c_predict_random_bytes_ct(rng, tmp):
    (tmp / "ct.nii.gz").write_bytes(rng.bytes(3000))
    return _command(["predict", str(tmp / "ct.nii.gz"), "--mask", str(tmp / "ct.nii.gz"),
                     "--params", str(REPO / "params.yaml")], tmp)


@input_class("cli")
def c_predict_2d_ct(rng, tmp):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.int16)), str(tmp / "flat.nii.gz"))
    return _command(["predict", str(tmp / "flat.nii.gz"), "--mask", str(tmp / "flat.nii.gz"),
                     "--params", str(REPO / "params.yaml")], tmp)


@input_class("cli")
def c_predict_mask_on_another_grid(rng, tmp):
    ct = _ct(tmp)
    mask = _ct(tmp, "m.nii.gz", shape=(10, 16, 16), dtype=np.uint8, value=1)
    return _command(["predict", str(ct), "--mask", str(mask), "--params", str(REPO / "params.yaml")], tmp)


# --- running -------------------------------------------------------------------------------------

def _snapshot(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _outcome(result: object) -> str:
    if isinstance(result, subprocess.CompletedProcess):
        if "Traceback (most recent call last)" in result.stderr:
            return "traceback"
        return "ok" if result.returncode == 0 else "user_error" if result.returncode in (1, 2) else "traceback"
    return "ok"


def run_class(cls: InputClass, seed: int, watched: Path) -> str:
    """One example of ``cls``: its outcome (see the module docstring)."""
    from bonemet.errors import UserError

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(dir=watched) as tmp:
        tmp = Path(tmp)
        call = cls.build(rng, tmp)
        before = _snapshot(watched)
        try:
            outcome = _outcome(call())
        except UserError:
            outcome = "user_error"
        except Exception:  # noqa: BLE001 - what is counted here is exactly the unexpected
            outcome = "traceback"
        created = {p for p in _snapshot(watched) - before if not p.is_relative_to(tmp)}
        if created:
            outcome = "wrote_outside"
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one example per class")
    parser.add_argument("--examples", type=int, default=5, help="examples per class (default 5)")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "fuzz.json"), help="results file")
    args = parser.parse_args(argv)
    examples = 1 if args.quick else args.examples
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as watched_dir:
        watched = Path(watched_dir)
        with contextlib.chdir(watched):  # anything written to the working directory is caught too
            for k, cls in enumerate(CLASSES):
                outcomes = [run_class(cls, 1000 * k + e, watched) for e in range(examples)]
                rows.append({"class": cls.name, "target": cls.target, "may_pass": cls.may_pass,
                             "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))}})
    defects = [r for r in rows if set(r["outcomes"]) & {"traceback", "wrote_outside"}
               or (not r["may_pass"] and "ok" in r["outcomes"])]
    summary = {
        "n_classes": len(rows), "examples_per_class": examples, "seconds": round(time.perf_counter() - start, 1),
        "tracebacks": sum(r["outcomes"].get("traceback", 0) for r in rows),
        "writes_outside": sum(r["outcomes"].get("wrote_outside", 0) for r in rows),
        "accepted_when_they_should_not_be": sum(r["outcomes"].get("ok", 0) for r in rows if not r["may_pass"]),
        "by_target": {t: sum(1 for r in rows if r["target"] == t) for t in sorted({r["target"] for r in rows})},
        "classes": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k != "classes"}, indent=2))
    for row in defects:
        print(f"DEFECT {row['class']} ({row['target']}): {row['outcomes']}")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
