import pytest
import torch

from dlexport.exporter import load_model
from dlexport.plans.greedy import GreedyRemoval, even_layers
from dlexport.plans.stack import Stack


def _identity_layer(model, index: int) -> None:
    """Zero the output projections of one layer: its residual branches add nothing, it is the identity."""
    layer = model.model.layers[index] if hasattr(model.model, "layers") else model.model.decoder.layers[index]
    with torch.no_grad():
        for lin in (getattr(layer.self_attn, "o_proj", None), getattr(layer.self_attn, "out_proj", None),
                    getattr(getattr(layer, "mlp", None), "down_proj", None), getattr(layer, "fc2", None)):
            if lin is not None:
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()


def _own_text(stack: Stack, batch=8, tokens=24, seed=0) -> torch.Tensor:
    """Text sampled from the model itself, so that the full model is the best predictor of it."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, stack.lm_weight().shape[0], (batch, 1), generator=gen)
    with torch.inference_mode():
        for _ in range(tokens - 1):
            h, ex = stack.embed(ids)
            probs = torch.softmax(stack.logits(stack.run(h, ex, range(stack.num_layers))[:, -1]), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
    return ids


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize("metric", ["ppl", "agreement"])
def test_identity_layer_is_removed_first(shape, metric):
    model = load_model(shape, random_weights=True).model
    _identity_layer(model, 2)
    stack = Stack(model)
    greedy = GreedyRemoval(stack, _own_text(stack), metric)
    assert greedy.step().removed == 2


def _naive_greedy(stack, ids, ref):
    """Greedy removal recomputing every candidate from the embedding: what the cached version must equal."""
    kept, order = list(range(stack.num_layers)), []
    with torch.inference_mode():
        h0, ex = stack.embed(ids)
        while len(kept) > 1:
            losses = {j: stack.score(stack.run(h0, ex, [i for i in kept if i != j]), ids, ref).nll for j in kept}
            j = min(kept, key=losses.get)
            kept.remove(j)
            order.append(j)
    return order


def test_cached_greedy_equals_recomputing_everything(tiny_llama_model):
    stack = Stack(tiny_llama_model.model)
    ids = _own_text(stack, seed=1)
    greedy = GreedyRemoval(stack, ids, "ppl")
    steps = greedy.run(progress=False)
    assert [s.removed for s in steps] == _naive_greedy(stack, ids, greedy.ref_top1)


@pytest.mark.parametrize("rescore", [0, 2])
def test_ladder_is_nested_one_rung_per_depth(tiny_opt_model, rescore):
    stack = Stack(tiny_opt_model.model)
    greedy = GreedyRemoval(stack, _own_text(stack), "ppl", rescore)
    greedy.run(progress=False)
    ladder = greedy.ladder()
    assert [len(r) for r in ladder] == list(range(1, stack.num_layers + 1))
    assert ladder[-1] == tuple(range(stack.num_layers))
    for small, big in zip(ladder, ladder[1:]):
        assert set(small) < set(big) and list(small) == sorted(small)


def test_even_layers():
    assert even_layers(30, 24) == (0, 1, 3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16, 18, 19, 20, 21, 23, 24, 25, 26, 28, 29)
    assert even_layers(4, 4) == (0, 1, 2, 3)
    assert len(even_layers(30, 1)) == 1
