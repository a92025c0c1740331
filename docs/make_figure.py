"""Draw docs/mta.png, the overview of MTA's three stages, so the diagram is reproducible from code.

Run ``python docs/make_figure.py``; coordinates are in inches of the 12 x 4.5 in canvas.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402

WIDTH, HEIGHT = 12.0, 4.5
PANEL_W, PANEL_GAP = 3.5, 0.6
MARGIN = (WIDTH - 3 * PANEL_W - 2 * PANEL_GAP) / 2
BOX_W, BOX_H, STEP = 3.1, 0.46, 0.62
STAGES = [
    {
        "title": "1  Meta-LoRA Bank",
        "subtitle": "offline, once",
        "face": "#e8f0fb",
        "edge": "#3b6fb6",
        "steps": [
            "Anchor-candidate user histories",
            "Sentence embeddings",
            "k-means clusters",
            "One anchor user per cluster",
            "One LoRA per anchor\n(trained offline) = LoRA bank",
        ],
        "out_label": "LoRA\nbank",
    },
    {
        "title": "2  Adaptive LoRA Fusion",
        "subtitle": "per user, in memory",
        "face": "#eaf6ec",
        "edge": "#3c8d4f",
        "steps": [
            "Target user profile",
            "Embedding",
            "Cosine top-k anchors",
            r"Weights $w_i$ ∝ similarity",
            r"Exact merge $\Delta W = \Sigma_i\, w_i B_i A_i$" "\n(ranks concatenated)",
        ],
        "note": "nothing written per user",
        "in_step": 4,
        "out_label": "fused\n" r"$\Delta W$",
    },
    {
        "title": "3  LoRA Stacking",
        "subtitle": "per user, few-shot",
        "face": "#fdf0e3",
        "edge": "#c7711f",
        "steps": [
            "Frozen base LLM",
            r"+ fused adapter $\Delta W$ (frozen)",
            "+ ultra-low-rank LoRA (r = 1–4)",
            "trained on the user's few examples",
            "Stored per user:\nonly this tiny adapter",
        ],
        "in_step": 1,
    },
]


def box(ax, x, y, w, h, text, face, edge, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=face, edgecolor=edge, linewidth=1.2))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9.5,
            fontweight=weight, linespacing=1.15)


def arrow(ax, points, color, width=1.3, mutation=12):
    """A single patch along ``points``, so bends and the head render without seams."""
    ax.add_patch(FancyArrowPatch(path=MplPath(points), arrowstyle="-|>", mutation_scale=mutation,
                                 color=color, linewidth=width, joinstyle="miter"))


def main():
    fig = plt.figure(figsize=(WIDTH, HEIGHT), dpi=150)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(0, HEIGHT)
    ax.axis("off")

    boxes = []  # per stage: (x, y, w, h) of each step box
    for k, stage in enumerate(STAGES):
        x0 = MARGIN + k * (PANEL_W + PANEL_GAP)
        ax.add_patch(FancyBboxPatch((x0, 0.15), PANEL_W, HEIGHT - 0.3,
                                    boxstyle="round,pad=0,rounding_size=0.15",
                                    facecolor=stage["face"], edgecolor=stage["edge"], linewidth=1.6))
        ax.text(x0 + PANEL_W / 2, HEIGHT - 0.4, stage["title"], ha="center", va="center",
                fontsize=13, fontweight="bold", color=stage["edge"])
        ax.text(x0 + PANEL_W / 2, HEIGHT - 0.68, stage["subtitle"], ha="center", va="center",
                fontsize=9.5, style="italic", color="#444444")

        bx = x0 + (PANEL_W - BOX_W) / 2
        stage_boxes = []
        for i, text in enumerate(stage["steps"]):
            final = i == len(stage["steps"]) - 1
            h = BOX_H + (0.16 if final else 0)
            y = HEIGHT - 1.0 - BOX_H - i * STEP - (0.16 if final else 0)
            box(ax, bx, y, BOX_W, h, text, stage["edge"] + "33" if final else "white",
                stage["edge"], weight="bold" if final else "normal")
            if stage_boxes:
                above = stage_boxes[-1][1]
                arrow(ax, [(bx + BOX_W / 2, above), (bx + BOX_W / 2, y + h)], stage["edge"],
                      mutation=10)
            stage_boxes.append((bx, y, BOX_W, h))
        boxes.append(stage_boxes)
        if "note" in stage:
            ax.text(x0 + PANEL_W / 2, 0.3, stage["note"], ha="center", va="center", fontsize=9,
                    style="italic", color=stage["edge"])

    # Stage k's last box feeds the box of stage k + 1 named by its "in_step", routed through the
    # gap between panels so the arrow never crosses a box.
    for k in range(len(STAGES) - 1):
        sx, sy, sw, sh = boxes[k][-1]
        tx, ty, _, th = boxes[k + 1][STAGES[k + 1]["in_step"]]
        y_from, y_to = sy + sh / 2, ty + th / 2
        mid = (sx + sw + tx) / 2
        route = [(sx + sw + 0.03, y_from), (tx - 0.03, y_to)]
        if y_from != y_to:
            route[1:1] = [(mid, y_from), (mid, y_to)]
        arrow(ax, route, "#333333", width=2.2, mutation=18)
        ax.text(mid, y_to + 0.12, STAGES[k]["out_label"], ha="center", va="bottom",
                fontsize=8.5, color="#333333", linespacing=1.1)

    out = Path(__file__).with_name("mta.png")
    fig.savefig(out, dpi=150)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
