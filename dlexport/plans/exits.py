"""Early-exit policies from data: which layers check the head, on which signal, at which threshold.

Signals are computed with ``runtime.exits.features`` (the run-time definitions) from the head at every layer over
teacher-forced text; a token "agrees" when its exit prediction equals the full model's. The cost of a token is the
layers it runs plus one head call per exit check (plus the final head when it never exits): the runtime fills the
deeper key/values of exited tokens later, batched with the next token, which on a bandwidth-bound decode step is
nearly free, so that fill is not counted. Exit layers are chosen by forward selection, the threshold by a scan.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..runtime.exits import features
from .costs import Costs

FEATURES = ("top1_prob", "gap", "layer_fraction")
CRITERIA = ("top1_prob", "gap", "classifier")


@dataclass
class Signals:
    """Per layer (rows) and token (columns): exit features and whether the layer's top-1 equals the final one."""

    top1_prob: torch.Tensor
    gap: torch.Tensor
    agree: torch.Tensor
    nll: torch.Tensor  # [layers] mean next-token loss of each layer's own prediction (static exit at that depth)

    @property
    def num_layers(self) -> int:
        return self.agree.shape[0]

    def feature_matrix(self, layer: int) -> torch.Tensor:
        frac = torch.full_like(self.gap[layer], (layer + 1) / self.num_layers)
        return torch.stack([self.top1_prob[layer], self.gap[layer], frac], -1)


def collect_signals(stack, ids: torch.Tensor, adapters: dict | None = None, progress: bool = False) -> Signals:
    """Run the full model once, scoring the head (after the layer's adapter, if any) at every layer."""
    n = stack.num_layers
    probs, gaps, preds, nlls = [], [], [], []
    targets = ids[:, 1:].reshape(-1)
    with torch.inference_mode():
        hidden, extras = stack.embed(ids)
        for i in tqdm(range(n), desc="head at every layer", disable=not progress):
            hidden = stack.layer(i, hidden, extras)
            h = adapters[i](hidden) if adapters and i in adapters else hidden
            p_, g_, t_, l_ = [], [], [], []
            for r in stack.rows(h.shape[0], h.shape[1]):
                logits = stack.logits(h[r, :-1]).float().reshape(-1, stack.lm_weight().shape[0])
                f = features(logits, (i + 1) / n)
                p_.append(f["top1_prob"])
                g_.append(f["gap"])
                t_.append(logits.argmax(-1))
                l_.append(torch.log_softmax(logits, -1))
            probs.append(torch.cat(p_))
            gaps.append(torch.cat(g_))
            preds.append(torch.cat(t_))
            nlls.append(-torch.cat(l_).gather(-1, targets[:, None]).mean())
    preds = torch.stack(preds)
    return Signals(torch.stack(probs), torch.stack(gaps), preds == preds[-1], torch.stack(nlls))


def fit_classifier(signals: Signals, steps: int = 200) -> tuple[tuple[float, ...], float]:
    """Logistic regression: P(layer's top-1 == final top-1 | top1_prob, gap, layer_fraction), over all layers."""
    layers = range(signals.num_layers - 1)
    x = torch.cat([signals.feature_matrix(i) for i in layers])
    y = torch.cat([signals.agree[i] for i in layers]).float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        loss.backward()
        return loss

    with torch.enable_grad(), torch.inference_mode(False):
        x, y = x.clone(), y.clone()
        opt.step(closure)
    return tuple(float(v) for v in w.detach()), float(b.detach())


def scores(signals: Signals, criterion: str, classifier=None) -> torch.Tensor:
    """[layers, tokens] exit scores, as ``runtime.exits.exit_score`` computes them."""
    if criterion == "top1_prob":
        return signals.top1_prob
    if criterion == "gap":
        return signals.gap
    w, b = classifier
    return torch.stack([torch.sigmoid(signals.feature_matrix(i) @ torch.tensor(w) + b)
                        for i in range(signals.num_layers)])


@dataclass
class Outcome:
    """Expected behaviour of one policy on some tokens."""

    layers: tuple[int, ...]
    criterion: str
    threshold: float
    agreement: float
    cost: float  # per token, in Costs units
    speedup: float
    exit_rate: float
    mean_layers: float
    classifier: tuple | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"layers": list(self.layers), "criterion": self.criterion, "threshold": self.threshold,
             "agreement": round(self.agreement, 5), "cost": round(self.cost, 4), "speedup": round(self.speedup, 4),
             "exit_rate": round(self.exit_rate, 5), "mean_layers": round(self.mean_layers, 3)}
        if self.classifier:
            d["classifier"] = {"features": list(FEATURES), "weights": list(self.classifier[0]),
                               "bias": self.classifier[1]}
        return d


def _thresholds(s: torch.Tensor, count: int = 256) -> torch.Tensor:
    v = s.reshape(-1).sort().values
    idx = torch.linspace(0, v.numel() - 1, count).round().long()
    return torch.cat([v[idx].unique(), v[-1:] + 1e-6])


def simulate(s: torch.Tensor, agree: torch.Tensor, exit_layers, thresholds: torch.Tensor, costs: Costs,
             num_layers: int) -> dict[str, torch.Tensor]:
    """Agreement, cost, exit rate and mean layers per threshold, for exits at ``exit_layers`` (ascending)."""
    e = list(exit_layers)
    se, ae = s[e], agree[e]
    passed = se[None] >= thresholds[:, None, None]  # [G, E, N]
    any_ = passed.any(1)
    first = passed.to(torch.uint8).argmax(1)  # first exit layer that passes
    depth = torch.tensor(e)[first] + 1
    ok = torch.where(any_, torch.gather(ae.expand(len(thresholds), -1, -1), 1, first[:, None]).squeeze(1), True)
    layers = torch.where(any_, depth, num_layers).float()
    checks = torch.where(any_, first + 1, len(e) + 1).float()
    cost = layers * costs.layer + checks * costs.head
    return {"agreement": ok.float().mean(1), "cost": cost.mean(1), "exit_rate": any_.float().mean(1),
            "mean_layers": layers.mean(1)}


def _best_at(sim, target) -> int | None:
    feasible = sim["agreement"] >= target
    if not bool(feasible.any()):
        return None
    cost = torch.where(feasible, sim["cost"], torch.inf)
    return int(cost.argmin())


def _outcome(s, agree, layers, criterion, threshold, costs, n, classifier=None) -> Outcome:
    sim = simulate(s, agree, layers, torch.tensor([threshold]), costs, n)
    cost = float(sim["cost"][0])
    return Outcome(tuple(layers), criterion, threshold, float(sim["agreement"][0]), cost,
                   costs.step(n) / cost, float(sim["exit_rate"][0]), float(sim["mean_layers"][0]), classifier)


def search(signals: Signals, costs: Costs, target: float, criteria=CRITERIA, max_exits: int = 6,
           classifier=None) -> dict[str, Outcome | None]:
    """Cheapest policy per criterion at agreement >= ``target`` (None where none reaches it)."""
    n = signals.num_layers
    full_cost = costs.step(n)
    best: dict[str, Outcome | None] = {}
    for criterion in criteria:
        clf = classifier if criterion == "classifier" else None
        if criterion == "classifier" and clf is None:
            clf = fit_classifier(signals)
        s = scores(signals, criterion, clf)
        thresholds = _thresholds(s[: n - 1])
        chosen, found, cost = [], None, float("inf")
        while len(chosen) < max_exits:
            step_best = None
            for layer in range(n - 1):
                if layer in chosen:
                    continue
                layers = sorted(chosen + [layer])
                sim = simulate(s, signals.agree, layers, thresholds, costs, n)
                g = _best_at(sim, target)
                if g is not None and (step_best is None or sim["cost"][g] < step_best[0]):
                    step_best = (float(sim["cost"][g]), layers, float(thresholds[g]))
            if step_best is None or step_best[0] >= cost:
                break
            cost, chosen, threshold = step_best
            found = _outcome(s, signals.agree, chosen, criterion, threshold, costs, n, clf)
        best[criterion] = found
    best["none"] = Outcome((), "none", 0.0, 1.0, full_cost, 1.0, 0.0, float(n))
    return best


def evaluate(policy: Outcome, signals: Signals, costs: Costs) -> Outcome:
    """The same policy (layers, criterion, threshold) on other tokens, e.g. the held-out split."""
    if not policy.layers:
        return policy
    s = scores(signals, policy.criterion, policy.classifier)
    return _outcome(s, signals.agree, policy.layers, policy.criterion, policy.threshold, costs, signals.num_layers,
                    policy.classifier)
