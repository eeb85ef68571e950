"""report.html: one page that shows how a folder was grouped, readable offline from file://.

The page has no script, no style sheet or font from elsewhere, and no absolute URL: its
images are PNG files beside it, named by relative paths (`thumbs/`, `figures/`, `clusters/`),
so the output folder can be moved or zipped whole. What it shows:

- a summary line: images, clusters, how K was chosen, method, training time, skipped files;
- the cluster-size histogram, the curve K was chosen from (when --num_clusters auto), and a
  t-SNE of the features coloured by cluster;
- ACC / NMI / ARI and the confusion matrix, only when the folder has class sub-folders (at least
  two); labels are read for this report and nothing else;
- per cluster (`cluster 0` is the largest): its size, its most and its least confident images.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import torch

from clusterlab.callbacks.figures import confusion_figure, embedding_figure, pyplot

THUMB_SIDE = 96  # px, the longer side of a thumbnail


@dataclass
class ClusterView:
    """What the page shows of one cluster: thumbnails are paths relative to the page."""

    index: int
    size: int
    mean_confidence: float
    most: list[tuple[str, str, float]] = field(default_factory=list)  # (thumbnail, source path, confidence)
    least: list[tuple[str, str, float]] = field(default_factory=list)


def thumbnail(source: Path, fallback: torch.Tensor, target: Path) -> None:
    """A small PNG of the original file (sharper than the decoded working size); the decoded
    image when the file cannot be read again."""
    from PIL import Image, ImageOps

    try:
        with Image.open(source) as image:
            # A JPEG at the smallest scale that covers the thumbnail, as decode_image decodes it:
            # --max_pixels let it through at that scale, not at full size (a 65,000-px side).
            image.draft(None, (THUMB_SIDE, THUMB_SIDE))
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.BICUBIC)
            if max(image.size) < THUMB_SIDE:  # small images: enlarged without blurring
                scale = THUMB_SIDE / max(image.size)
                image = image.resize(
                    (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST
                )
            image.save(target)
    except (OSError, ValueError, SyntaxError):
        array = fallback.numpy()
        array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
        Image.fromarray(array).resize((THUMB_SIDE, THUMB_SIDE), Image.NEAREST).save(target)


def sizes_figure(sizes: list[int], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(sizes) + 2.5), 3.2))
    ax.bar(range(len(sizes)), sizes, color="#4C72B0")
    ax.set_xticks(range(len(sizes)), [str(k) for k in range(len(sizes))], fontsize=8)
    ax.set_xlabel("cluster")
    ax.set_ylabel("images")
    ax.set_title("cluster sizes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def k_curve_figure(curve: dict, path: Path) -> Path:
    """The criterion K was chosen by, over the range tried, with the choice marked."""
    plt = pyplot()
    ks, values = curve["k"], curve["value"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.errorbar(ks, values, yerr=curve.get("error"), marker="o", markersize=3, color="#4C72B0", capsize=2)
    if "threshold" in curve:  # the one-standard-error rule: the smallest K above this line
        ax.axhline(curve["threshold"], color="#888888", linestyle="--", linewidth=1)
    chosen = ks.index(curve["chosen"])
    ax.plot(
        [curve["chosen"]],
        [values[chosen]],
        marker="o",
        markersize=9,
        color="#C44E52",
        label=f"chosen: K = {curve['chosen']}",
    )
    ax.set_xlabel("K (number of clusters)")
    ax.set_ylabel(curve["label"])
    ax.set_title(curve["title"], fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_figures(
    outputs: dict,
    class_names: list[str],
    k_curve: dict | None,
    folder: Path,
    embedding_points: int = 2000,
    missing: dict[str, str] | None = None,
) -> dict[str, str]:
    """The page's figures into folder/; returns name -> file name. A figure that cannot be drawn
    (a t-SNE of identical features, say) never ends the run: a warning says why, and so does the
    page in its place (`missing`, filled with name -> reason, for write_html). A full disk is not
    the figure's fault and does end the run (clusterlab.errors.disk_full)."""
    import warnings

    from clusterlab.errors import disk_full

    folder.mkdir(parents=True, exist_ok=True)
    sizes = torch.bincount(outputs["cluster"], minlength=int(outputs["num_clusters"])).tolist()
    title = "clusters"
    jobs = [
        ("sizes", lambda p: sizes_figure(sizes, p)),
        ("embedding", lambda p: embedding_figure(outputs, embedding_points, title, p)),
    ]
    if k_curve is not None:
        jobs.append(("k_curve", lambda p: k_curve_figure(k_curve, p)))
    if (outputs["label"] >= 0).sum() > 0 and len(class_names) >= 2:
        jobs.append(("confusion", lambda p: confusion_figure(outputs, class_names, title, p)))
    drawn = {}
    for name, draw in jobs:
        try:
            drawn[name] = draw(folder / f"{name}.png").relative_to(folder.parent).as_posix()
        except Exception as error:  # noqa: BLE001 - a figure is a by-product
            if disk_full(error) is not None:
                raise
            warnings.warn(f"figure {name}.png not drawn: {type(error).__name__}: {error}", stacklevel=2)
            if missing is not None:
                missing[name] = f"{type(error).__name__}: {error}"
    return drawn


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin: 1.4em 0 0.3em; }
.summary { color: #444; } .muted { color: #777; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.figures figure { margin: 0; flex: 1 1 440px; max-width: 520px; }
.figures img { width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; max-width: 540px; }
nav a { margin-right: 0.6em; white-space: nowrap; }
.cluster { border-top: 1px solid #ddd; }
.row { display: flex; flex-wrap: wrap; gap: 4px; margin: 0.2em 0 0.6em; }
.row figure { margin: 0; text-align: center; font-size: 0.7em; color: #555; }
.row img { width: 96px; height: 96px; object-fit: contain; background: #f4f4f4; border: 1px solid #ddd;
           image-rendering: pixelated; display: block; }
.label { font-size: 0.85em; font-weight: 600; margin-top: 0.4em; }
"""


_TITLES = {
    "sizes": "The cluster sizes",
    "k_curve": "The curve K was chosen from",
    "embedding": "The t-SNE of the features",
    "confusion": "The confusion matrix",
}


class _Markup(str):
    """HTML that a template of this module rendered (or a constant of it): inserted as it is."""


def _render(template: Template, **values) -> _Markup:
    """`template` filled in, every value HTML-escaped except the markup this module made: a path or
    a folder name with `<`, `&` or quotes in it shows as text and never becomes markup."""
    escaped = {k: v if isinstance(v, _Markup) else html.escape(str(v), quote=True) for k, v in values.items()}
    return _Markup(template.substitute(escaped))


_PAGE = Template(
    """\
<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>clusterlab: $folder in $num_clusters clusters</title>
<style>$style</style></head><body>
<h1>$folder: $images images in $num_clusters clusters</h1>
<p class="summary">$k_line. Method $method, $epochs epochs$features, $train_minutes min of training, \
$total_minutes min in all$skipped. Every image's cluster: <a href="assignments.csv">assignments.csv</a>.</p>
<nav class="muted">$nav</nav>
<h2>Overview</h2>
<div class="figures">
${figures}</div>
${metrics}<h2>Clusters</h2>
${clusters}<h2>Files</h2><p class="muted">
<a href="assignments.csv">assignments.csv</a> (path, cluster, confidence),
<a href="skipped.csv">skipped.csv</a> (path, reason),
clusters/&lt;k&gt;.png (contact sheets), <a href="config.yaml">config.yaml</a> and checkpoints/last.ckpt \
(the model). Group new images with the same clusters:</p>
<pre>$predict_command</pre>
</body></html>
"""
)
_K_CHOSEN = Template("K = $k chosen from the data ($how)")
_K_GIVEN = Template("K = $k (given)")
_FEATURES = Template(" after $epochs epochs of SimCLR features")
_BACKBONE = Template(" on the frozen features of $backbone (weights: $weights; embedded in $precision)")
_SKIPPED = Template(', <a href="skipped.csv">$count unreadable file$plural skipped</a>')
_NAV = Template('<a href="#cluster-$index">cluster $index ($size)</a>')
_FIGURE = Template('<figure><img src="$src" alt="$name"><figcaption>$caption</figcaption></figure>\n')
_MISSING = Template(
    '<figure class="missing"><p class="muted">$title could not be drawn: $why</p>'
    "<figcaption>$caption</figcaption></figure>\n"
)
_METRICS = Template(
    """\
<h2>Against the class sub-folders</h2>
<p class="muted">$labelled images lie in $classes class sub-folders. ACC matches clusters to classes one \
to one (Hungarian); NMI and ARI need no matching.</p>
<table><tr><th></th><th>ACC</th><th>NMI</th><th>ARI</th></tr>
<tr><td>$method, K = $k</td><td>$acc</td><td>$nmi</td><td>$ari</td></tr></table>
"""
)
_CLUSTER = Template(
    """\
<section class="cluster" id="cluster-$index">
<h2>cluster $index <span class="muted">$size images ($share%), mean confidence $confidence, \
<a href="clusters/$index.png">contact sheet</a></span></h2>
${rows}</section>
"""
)
_ROW = Template('<div class="label">$which confident</div>\n<div class="row">$thumbs</div>\n')
_THUMB = Template(
    '<figure><img src="$src" alt="$source" title="$source"><figcaption>$confidence</figcaption></figure>'
)
_CAPTIONS = {
    "sizes": "Images per cluster. Clusters are numbered by size: cluster 0 is the largest.",
    "embedding": "t-SNE of the learned features; colour = cluster. Nearby points look alike to the model.",
    "confusion": "Class sub-folders (rows) against clusters (columns): read from the folder names for "
    "this report only; they chose nothing.",
}


def _join(parts) -> _Markup:
    return _Markup("".join(parts))


def _figures(figures: dict[str, str], missing: dict[str, str], k_caption: str) -> _Markup:
    """The overview: each figure with its caption, or why it could not be drawn."""
    parts = []
    for name in ("sizes", "k_curve", "embedding", "confusion"):
        caption = k_caption if name == "k_curve" else _CAPTIONS[name]
        if name in figures:
            parts.append(_render(_FIGURE, src=figures[name], name=name, caption=caption))
        elif name in missing:
            parts.append(_render(_MISSING, title=_TITLES[name], why=missing[name], caption=caption))
    return _join(parts)


def _cluster(c: ClusterView, images: int) -> _Markup:
    """One cluster's section: its size and confidence, its most and its least confident images."""
    rows = []
    for which, items in (("most", c.most), ("least", c.least)):
        if items:
            thumbs = _join(
                _render(_THUMB, src=thumb, source=source, confidence=f"{confidence:.2f}")
                for thumb, source, confidence in items
            )
            rows.append(_render(_ROW, which=which, thumbs=thumbs))
    share = 100.0 * c.size / max(1, images)
    return _render(
        _CLUSTER,
        index=c.index,
        size=f"{c.size:,}",
        share=f"{share:.1f}",
        confidence=f"{c.mean_confidence:.2f}",
        rows=_join(rows),
    )


def write_html(
    path: Path,
    summary: dict,
    clusters: list[ClusterView],
    figures: dict[str, str],
    metrics: dict | None,
) -> Path:
    """The page itself. `summary` holds the folder, counts, K and how it was chosen, and timings,
    and `figures_not_drawn`: name -> why, shown in the place of each figure that could not be drawn."""
    s = summary
    k = s["num_clusters"]
    skipped = s["skipped"]
    page = _render(
        _PAGE,
        style=_Markup(_STYLE),
        folder=s["folder"],
        num_clusters=k,
        images=f"{s['images']:,}",
        k_line=_render(_K_CHOSEN, k=k, how=s["k_method"]) if s["k_auto"] else _render(_K_GIVEN, k=k),
        method=s["method"],
        epochs=s["epochs"],
        features=_features_line(s),
        train_minutes=f"{s['train_minutes']:.1f}",
        total_minutes=f"{s['total_minutes']:.1f}",
        skipped=_render(_SKIPPED, count=skipped, plural="s" if skipped != 1 else "")
        if skipped
        else ", no unreadable file",
        nav=_Markup(" ".join(_render(_NAV, index=c.index, size=f"{c.size:,}") for c in clusters)),
        figures=_figures(figures, s.get("figures_not_drawn") or {}, s.get("k_caption", "")),
        metrics=_render(
            _METRICS,
            labelled=f"{metrics['labelled']:,}",
            classes=metrics["classes"],
            method=s["method"],
            k=k,
            **{m: f"{metrics[m]:.4f}" for m in ("acc", "nmi", "ari")},
        )
        if metrics
        else "",
        clusters=_join(_cluster(c, s["images"]) for c in clusters),
        predict_command=s["predict_command"],
    )
    path.write_text(page, encoding="utf-8")
    return path


def _features_line(s: dict) -> str:
    """What the method's features came from: a pretrained network and its weights file, or the
    SimCLR pretext trained on the folder."""
    if s.get("backbone"):
        precision = "bfloat16" if s.get("precision") == "bf16" else "float32"
        return _render(_BACKBONE, backbone=s["backbone"], weights=s["weights"], precision=precision)
    return _render(_FEATURES, epochs=s["features_epochs"]) if s.get("features_epochs") else ""


def cluster_views(
    outputs: dict, paths: list[str], images: torch.Tensor, sources: list[Path], folder: Path, per_row: int = 8
) -> list[ClusterView]:
    """Thumbnails of each cluster's most and least confident images into folder/<k>/; the views of
    every cluster, in cluster order (cluster 0 is the largest)."""
    views = []
    cluster, confidence = outputs["cluster"], outputs["confidence"]
    for k in range(int(outputs["num_clusters"])):
        members = (cluster == k).nonzero().flatten()
        view = ClusterView(k, len(members), float(confidence[members].mean()) if len(members) else 0.0)
        if len(members):
            ranked = members[confidence[members].argsort(descending=True)]
            most = ranked[:per_row].tolist()
            least = [i for i in ranked.flip(0)[:per_row].flip(0).tolist() if i not in most]
            (folder / str(k)).mkdir(parents=True, exist_ok=True)
            for kind, chosen in (("most", most), ("least", least)):
                for rank, i in enumerate(chosen):
                    target = folder / str(k) / f"{kind}_{rank}.png"
                    thumbnail(sources[i], images[i], target)
                    getattr(view, kind).append(
                        (target.relative_to(folder.parent).as_posix(), paths[i], float(confidence[i]))
                    )
        views.append(view)
    return views
