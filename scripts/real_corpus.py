"""A real English corpus from Debian's documentation packages, as `dlm data build` shards.

    python scripts/real_corpus.py all --out data/debian-docs --seq-len 1024 --vocab-size 16384
    python scripts/real_corpus.py subset --out data/debian-docs --max-mb 60   # to carry elsewhere

Stages (`all` runs the first four; each can run alone on the same --out):

    download  apt-get update; apt-get download PACKAGES into OUT/debs (Debian, as root)
    extract   dpkg-deb -x every .deb into OUT/extracted/<package>
    clean     one document per file (long files: per section) of prose, as OUT/documents.jsonl
              (fields text, package, path) in a seeded random order: markup stripped, code
              blocks, tables and non-English copies dropped, exact duplicates and repeated long
              paragraphs removed
              (`data_pipeline.doc_corpus`); per-package counts in OUT/clean_stats.json
    build     dlm data build OUT/documents.jsonl -> OUT/shards (a BPE of --vocab-size trained on
              it, blocks of --seq-len); OUT/shards/debian_packages.json records every package's
              version and sha256 and the documents and characters it gave; prints the counts
    subset    dlm data subset OUT/shards -> OUT/subset-<MB>mb (the first shards, same tokenizer)

The package list (`PACKAGES`) holds English manuals, references and guides from Debian 12's
main archive; `--packages` replaces it. Data stays under data/ (not in git).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.doc_corpus import Deduper, PackageSpec, read_documents  # noqa: E402

SHUFFLE_SEED = 0
# Debian 12 (bookworm) main: English prose documentation, largest first where it is prose
PACKAGES: dict[str, PackageSpec] = {
    spec.name: spec
    for spec in (
        PackageSpec(name="linux-doc-6.1", include=r"/html/", html=True),
        PackageSpec(name="python3.11-doc", include=r"/_sources/"),
        PackageSpec(name="perl-doc"),
        PackageSpec(name="postgresql-doc-15"),
        PackageSpec(name="git-doc", formats=((".txt", "asciidoc"),), exclude=r"/RelNotes/"),
        PackageSpec(name="python-django-doc"),
        PackageSpec(name="python-sqlalchemy-doc", include=r"\.rst$"),
        PackageSpec(name="sphinx-doc", include=r"/_sources/"),
        PackageSpec(name="cmake-doc", include=r"/_sources/"),
        PackageSpec(name="python-sklearn-doc", html=True),
        PackageSpec(name="python-pandas-doc", html=True),
        PackageSpec(name="python-scipy-doc"),
        PackageSpec(name="python-sympy-doc", html=True),
        PackageSpec(name="llvm-14-doc", include=r"/_sources/"),
        PackageSpec(name="clang-14-doc", include=r"/_sources/"),
        PackageSpec(name="ghc-doc", include=r"users_guide/.*_sources/"),
        PackageSpec(name="erlang-doc"),
        PackageSpec(name="nodejs-doc"),
        PackageSpec(
            name="rust-doc",
            # the books and guides, and the standard library's API (`core` and `alloc` are
            # copies of parts of it)
            include=r"/html/(book|reference|nomicon|edition-guide|embedded-book|rust-by-example"
            r"|rustc|rustdoc|unstable-book)/|/html/std/|/html/[\w-]+\.html$",
        ),
        PackageSpec(name="octave-doc"),
        PackageSpec(name="qemu-system-common", include=r"/doc/"),
        PackageSpec(name="python-flask-doc", include=r"/_sources/"),
        PackageSpec(name="python-werkzeug-doc", include=r"/_sources/"),
        PackageSpec(name="python-mpmath-doc"),
        PackageSpec(name="haskell98-report"),
        PackageSpec(name="sagemath-doc", include=r"/html/en/", html=True),
        PackageSpec(name="racket-doc"),
        PackageSpec(name="lilypond-doc-html"),
        PackageSpec(name="qtbase5-doc-html"),
        PackageSpec(name="python-statsmodels-doc", html=True),
        PackageSpec(name="python-astropy-doc", html=True),
        PackageSpec(name="twisted-doc"),
        PackageSpec(name="dpdk-doc", include=r"/_sources/"),
        PackageSpec(name="pacemaker-doc", include=r"/singlehtml/"),
        PackageSpec(name="gnucash-docs", include=r"-en/"),
        PackageSpec(name="gnome-user-docs", include=r"/help/C/", formats=((".page", "html"),)),
        PackageSpec(name="mate-user-guide", include=r"/help/C/", formats=((".xml", "html"),)),
        PackageSpec(name="db5.3-doc"),
        PackageSpec(name="python-celery-doc", html=True),
        PackageSpec(name="derby-doc"),
        PackageSpec(name="openjdk-17-doc", include=r"/api/"),
        PackageSpec(name="apache2-doc", include=r"/manual/en/"),
        PackageSpec(name="maxima-doc"),
        PackageSpec(name="kicad-doc-en"),
        PackageSpec(name="python-biopython-doc", include=r"/Doc/"),
        PackageSpec(name="python-djangorestframework-doc"),
        PackageSpec(name="python-nibabel-doc"),
        *(
            PackageSpec(name=f"python-{name}-doc", html=True)
            for name in (
                "dask",
                "distributed",
                "xarray",
                "qutip",
                "ase",
                "pytest",
                "skimage",
                "rdflib",
                "mdanalysis",
                "tables",
                "sqlobject",
                "pymatgen",
                "fluids",
                "brian",
                "astroquery",
                "sfepy",
                "silx",
                "escript",
                "vispy",
                "ezdxf",
                "taurus",
                "ruffus",
                "xraylarch",
                "sortedcontainers",
            )
        ),  # fmt: skip
        PackageSpec(name="gimp-help-en"),
        PackageSpec(name="libreoffice-help-en-us"),
        PackageSpec(name="sqlite3-doc"),
        PackageSpec(name="cppreference-doc-en-html"),
        PackageSpec(name="autoconf-doc"),
        PackageSpec(name="scala-doc", include=r"/api/"),
        PackageSpec(name="debian-handbook"),
        PackageSpec(name="debian-reference-en"),
        PackageSpec(name="debian-policy", include=r"/_sources/"),
        PackageSpec(name="developers-reference", include=r"/_sources/"),
        PackageSpec(name="maint-guide"),
        PackageSpec(name="debian-faq"),
        PackageSpec(name="debian-history"),
        PackageSpec(name="bash-doc"),
        PackageSpec(name="gnu-standards"),
    )
}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def _debs(out: Path) -> dict[str, Path]:
    """package name -> its downloaded .deb (the newest if several)."""
    found: dict[str, Path] = {}
    for deb in sorted((out / "debs").glob("*.deb")):
        found[deb.name.split("_", 1)[0]] = deb
    return found


def download(out: Path, packages: list[str], update: bool) -> None:
    debs = out / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if update:
        _run(["apt-get", "update", "-qq"])
    missing = [p for p in packages if p not in _debs(out)]
    if missing:
        _run(["apt-get", "download", *missing], cwd=debs)


def extract(out: Path, packages: list[str]) -> None:
    debs = _debs(out)
    for name in packages:
        target = out / "extracted" / name
        if not target.is_dir():
            tmp = target.with_name(name + ".partial")
            subprocess.run(["rm", "-rf", str(tmp)], check=True)
            tmp.mkdir(parents=True)
            _run(["dpkg-deb", "-x", str(debs[name]), str(tmp)])
            tmp.rename(target)


def clean(out: Path, packages: list[str]) -> dict:
    stats: dict = {}
    deduper = Deduper()
    trees = [(PACKAGES.get(p, PackageSpec(name=p)), out / "extracted" / p) for p in packages]
    tmp = out / "documents.jsonl.partial"
    t0 = time.perf_counter()
    docs = list(read_documents(trees, deduper=deduper, stats=stats))
    # a seeded shuffle: the packages are read one after another, and without it the first
    # shards (what `subset` keeps) would hold the first packages only
    random.Random(SHUFFLE_SEED).shuffle(docs)
    with tmp.open("w", encoding="utf-8") as fh:
        for doc in docs:
            record = {"text": doc.text, "package": doc.package, "path": doc.path}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.rename(out / "documents.jsonl")
    summary = {
        "packages": stats,
        "dropped_duplicate_documents": deduper.dropped_documents,
        "dropped_repeated_paragraphs": deduper.dropped_paragraphs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "clean_stats.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, row in stats.items():
        print(f"{name:24s} {row['files']:6d} files {row['documents']:6d} docs "
              f"{row['characters'] / 1e6:8.2f} M chars")  # fmt: skip
    return summary


def package_record(out: Path, packages: list[str]) -> dict:
    """Name, version, architecture and sha256 of every .deb used, with its clean counts."""
    stats = json.loads((out / "clean_stats.json").read_text())["packages"]
    debs = _debs(out)
    record = {}
    for name in packages:
        deb = debs[name]
        fields = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        info = dict(line.split(": ", 1) for line in fields.strip().splitlines())
        record[name] = {
            "version": info.get("Version"),
            "architecture": info.get("Architecture"),
            "deb": deb.name,
            "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
            **stats.get(name, {}),
        }
    return record


def build(out: Path, packages: list[str], *, seq_len: int, vocab_size: int, shard_mb: float):
    shards = out / "shards"
    _run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "data",
            "build",
            str(out / "documents.jsonl"),
            "--out",
            str(shards),
            "--seq-len",
            str(seq_len),
            "--vocab-size",
            str(vocab_size),
            "--shard-size-mb",
            str(shard_mb),
            "--overwrite",
            "--no-progress",
        ],
        cwd=REPO,
    )
    from data_pipeline.manifest import Manifest

    manifest = Manifest.load(shards)
    tokens = {k: sum(s.num_tokens for s in v) for k, v in manifest.splits.items()}
    record = {
        "packages": package_record(out, packages),
        "documents": manifest.sources.documents,
        "tokens": tokens,
        "seq_len": seq_len,
        "vocab_size": manifest.tokenizer.vocab_size,
    }
    (shards / "debian_packages.json").write_text(json.dumps(record, indent=1) + "\n")
    size = sum(p.stat().st_size for p in shards.iterdir()) / (1 << 20)
    print(
        f"corpus: {sum(manifest.sources.documents.values())} documents "
        f"({', '.join(f'{k} {v}' for k, v in manifest.sources.documents.items())}), "
        f"{sum(tokens.values()):,} tokens ({', '.join(f'{k} {v:,}' for k, v in tokens.items())}) "
        f"in {size:.0f} MiB of shards at {shards}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["all", "download", "extract", "clean", "build", "subset"])
    parser.add_argument("--out", default="data/debian-docs", help="working directory")
    parser.add_argument("--packages", nargs="*", default=list(PACKAGES), help="Debian packages")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per block")
    parser.add_argument("--vocab-size", type=int, default=16384, help="BPE vocabulary")
    parser.add_argument("--shard-mb", type=float, default=4.0, help="target shard size (MB)")
    parser.add_argument("--no-update", action="store_true", help="skip apt-get update")
    parser.add_argument("--max-mb", type=float, default=60.0, help="subset size budget (MiB)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = ["download", "extract", "clean", "build"] if args.stage == "all" else [args.stage]
    for stage in stages:
        if stage == "download":
            download(out, args.packages, update=not args.no_update)
        elif stage == "extract":
            extract(out, args.packages)
        elif stage == "clean":
            clean(out, args.packages)
        elif stage == "build":
            build(
                out,
                args.packages,
                seq_len=args.seq_len,
                vocab_size=args.vocab_size,
                shard_mb=args.shard_mb,
            )
        else:
            target = out / f"subset-{args.max_mb:g}mb"
            _run(
                [
                    sys.executable,
                    "-m",
                    "launcher.cli",
                    "data",
                    "subset",
                    str(out / "shards"),
                    "--out",
                    str(target),
                    "--max-mb",
                    str(args.max_mb),
                    "--overwrite",
                ],
                cwd=REPO,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
