"""Exact against approximate (HNSW, usearch) search in an edge-run index: latency, recall@10, build time, size.

    python benchmarks/index_ann.py                                  # 100k x 512, 1000 queries
    python benchmarks/index_ann.py --connectivity 16,32 --expansion-search 32,64,128 --json-out r.json

The gallery is a Gaussian mixture on the unit sphere, so that neighbours mean something: --centres
random unit centres with uneven weights (Dirichlet), each cluster spread along its own random
--rank-dimensional subspace (per-cluster scale in --spread) plus a small isotropic noise
(--noise), then L2-normalised; --rank 0 spreads clusters isotropically instead (the hardest case
for a graph index: within a cluster the neighbours are set by 512-d noise). Queries are held-out
draws from the same mixture. Exact search is the index's own matmul + argpartition; recall@10 is
the share of exact top-10 ids the approximate top-10 finds. Latency is per query, one query per
call (the interactive case) and all queries in one call (batched), median after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from edgerun.runtime.index import AnnSettings, open_index, write_index

IDENTITY = {"source": "benchmark", "revision": None, "architecture": "none", "weights_sha256": None}


def mixture(rng, n: int, centres: np.ndarray, weights: np.ndarray, bases, scales, noise: float) -> np.ndarray:
    """n draws from the mixture, L2-normalised. bases : (c, rank, d), or None for isotropic clusters."""
    dim = centres.shape[1]
    label = rng.choice(len(centres), size=n, p=weights)
    x = centres[label] + noise * rng.standard_normal((n, dim)) / np.sqrt(dim)
    for c in np.unique(label):
        rows = np.flatnonzero(label == c)
        if bases is None:
            x[rows] += scales[c] * rng.standard_normal((len(rows), dim)) / np.sqrt(dim)
        else:
            coef = rng.standard_normal((len(rows), bases.shape[1])) / np.sqrt(bases.shape[1])
            x[rows] += scales[c] * coef @ bases[c]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(args) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.centres, args.dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(args.centres, 2.0))
    scales = rng.uniform(*args.spread, size=args.centres)
    bases = None
    if args.rank:
        bases = np.linalg.qr(rng.standard_normal((args.centres, args.dim, args.rank)))[0].transpose(0, 2, 1)
    gallery = mixture(rng, args.n, centres, weights, bases, scales, args.noise)
    queries = mixture(rng, args.queries, centres, weights, bases, scales, args.noise)
    return gallery, queries


def per_query_ms(index, queries: np.ndarray, k: int, exact: bool) -> dict:
    index.search_vectors(queries[:5], k, exact=exact)  # warm-up: page in, open the graph
    times = []
    for i in range(len(queries)):
        start = time.perf_counter()
        index.search_vectors(queries[i:i + 1], k, exact=exact)
        times.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    _, ids = index.search_vectors(queries, k, exact=exact)
    batched = (time.perf_counter() - start) * 1000 / len(queries)
    times.sort()
    return {"single_p50_ms": statistics.median(times), "single_p90_ms": times[int(0.9 * len(times))],
            "single_mean_ms": statistics.fmean(times), "batched_ms": batched, "ids": ids}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def run(args) -> dict:
    start = time.perf_counter()
    gallery, queries = make_data(args)
    result = {"setup": {k: v for k, v in vars(args).items() if k != "json_out"}, "cpus": os.cpu_count(),
              "data_seconds": time.perf_counter() - start, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        items = [f"img{i:06d}.jpg" for i in range(len(gallery))]
        start = time.perf_counter()
        exact_index = write_index(Path(tmp, "exact"), gallery, items, bundle="none", identity=IDENTITY)
        result["exact_build_seconds"] = time.perf_counter() - start
        result["vectors_bytes"] = exact_index.file("vectors").stat().st_size
        exact = per_query_ms(exact_index, queries, args.k, exact=True)
        truth = exact.pop("ids")
        result["exact"] = exact
        for m in args.connectivity:
            settings = AnnSettings(connectivity=m, expansion_add=args.expansion_add,
                                   expansion_search=max(args.expansion_search), dtype=args.dtype)
            start = time.perf_counter()
            index = write_index(Path(tmp, f"ann{m}"), gallery, items, bundle="none", identity=IDENTITY,
                                ann=settings)
            build = time.perf_counter() - start
            start = time.perf_counter()
            index = open_index(index.path)
            opened = time.perf_counter() - start
            graph_bytes = index.file("ann").stat().st_size
            graph_memory = int(index._graph(view=False).memory_usage)  # loaded, as --add holds it
            for ef in args.expansion_search:
                index.meta = replace(index.meta, ann=replace(settings, expansion_search=ef))
                ann = per_query_ms(index, queries, args.k, exact=False)
                ann["recall_at_k"] = recall(ann.pop("ids"), truth)
                result["runs"].append({**asdict(replace(settings, expansion_search=ef)), **ann,
                                       "build_seconds": build, "open_seconds": opened, "graph_file_bytes": graph_bytes,
                                       "graph_memory_bytes": graph_memory})
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def table(result: dict) -> str:
    e = result["exact"]
    s = result["setup"]
    head = (f"gallery {s['n']} x {s['dim']}, {s['centres']} centres (rank {s['rank']}), {s['queries']} queries, "
            f"top-{s['k']}, {result['cpus']} CPUs, peak RSS {result['peak_rss_mb']:.0f} MB")
    columns = (f"{'search':30s} {'p50 ms':>8s} {'p90 ms':>8s} {'batched ms/q':>13s} {'recall@k':>9s} "
               f"{'build s':>8s} {'disk MB':>8s} {'graph RAM MB':>13s}")
    exact = (f"{'exact (matmul + argpartition)':30s} {e['single_p50_ms']:8.2f} {e['single_p90_ms']:8.2f} "
             f"{e['batched_ms']:13.3f} {1.0:9.3f} {result['exact_build_seconds']:8.1f} "
             f"{result['vectors_bytes'] / 1e6:8.1f} {'-':>13s}")
    lines = [head, columns, exact]
    for r in result["runs"]:
        name = f"hnsw M={r['connectivity']} efC={r['expansion_add']} ef={r['expansion_search']} {r['dtype']}"
        lines.append(f"{name:30s} {r['single_p50_ms']:8.2f} {r['single_p90_ms']:8.2f} {r['batched_ms']:13.3f} "
                     f"{r['recall_at_k']:9.3f} {r['build_seconds']:8.1f} "
                     f"{(result['vectors_bytes'] + r['graph_file_bytes']) / 1e6:8.1f} "
                     f"{r['graph_memory_bytes'] / 1e6:13.1f}")
    return "\n".join(lines)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--centres", type=int, default=1000)
    p.add_argument("--rank", type=int, default=16, help="per-cluster subspace rank; 0 = isotropic clusters")
    p.add_argument("--spread", type=float, nargs=2, default=(0.4, 0.8), help="range of per-cluster scales")
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--connectivity", type=ints, default=[16])
    p.add_argument("--expansion-add", type=int, default=AnnSettings.expansion_add)
    p.add_argument("--expansion-search", type=ints, default=[32, 64, 128])
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "i8"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    result = run(args)
    print(table(result))
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
