import torch

from serving.sampling import sample_generator, sample_tokens


def test_greedy_rows_take_the_argmax_and_report_raw_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    tokens, logprobs = sample_tokens(logits, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]),
                                     torch.tensor([0.99, 0.01]))
    assert tokens.tolist() == [1, 0]
    expected = torch.log_softmax(logits, -1)[[0, 1], [1, 0]]
    assert torch.allclose(logprobs, expected)


def test_inverse_cdf_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(5, -1)
    uniforms = torch.tensor([0.1, 0.49, 0.51, 0.79, 0.81])
    tokens, _ = sample_tokens(logits, torch.ones(5), torch.ones(5), uniforms)
    assert tokens.tolist() == [0, 0, 1, 1, 2]


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.1, 0.6, 0.3])  # sorted: 1 (0.6), 2 (0.3), 0 (0.1)
    logits = probs.log().expand(4, -1)
    uniforms = torch.tensor([0.0, 0.5, 0.7, 0.999])
    tokens, _ = sample_tokens(logits, torch.ones(4), torch.full((4,), 0.8), uniforms)
    # with top_p=0.8 only tokens 1 and 2 remain, renormalized to 2/3 and 1/3
    assert tokens.tolist() == [1, 1, 2, 2]
    tiny, _ = sample_tokens(logits, torch.ones(4), torch.full((4,), 0.01), uniforms)
    assert tiny.tolist() == [1, 1, 1, 1]


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]]).expand(2000, -1)
    uniforms = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    hot, _ = sample_tokens(logits, torch.full((2000,), 2.0), torch.ones(2000), uniforms)
    cold, _ = sample_tokens(logits, torch.full((2000,), 0.25), torch.ones(2000), uniforms)
    assert (cold == 0).float().mean() > 0.95 > (hot == 0).float().mean() > 0.55


def test_generators_are_reproducible_and_differ_per_sample():
    a = [torch.rand(3, generator=sample_generator(7, i)) for i in range(2)]
    b = [torch.rand(3, generator=sample_generator(7, i)) for i in range(2)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(torch.rand(3, generator=sample_generator(None, 0)),
                           torch.rand(3, generator=sample_generator(None, 0)))


def test_blocked_tokens_are_never_picked_but_keep_their_raw_logprob():
    logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    blocked = (torch.tensor([0]), torch.tensor([0]))
    tokens, logprobs = sample_tokens(logits, torch.zeros(2), torch.ones(2), torch.tensor([0.5, 0.5]), blocked)
    assert tokens[0].item() != 0 and tokens[1].item() == 0
    assert torch.allclose(logprobs[0], torch.log_softmax(logits[0], -1)[tokens[0]])


def reference_sample_tokens(logits, temperatures, top_ps, uniforms):
    """The sampling rule spelled out with a full sort of every row (what the fast paths must equal)."""
    raw = torch.log_softmax(logits.float(), dim=-1)
    tokens = []
    for row in range(logits.shape[0]):
        if temperatures[row] <= 0:
            tokens.append(int(logits[row].argmax()))
            continue
        probs = torch.softmax(logits[row].float() / temperatures[row], dim=-1)
        if top_ps[row] >= 1:  # the whole distribution, in vocabulary order
            cumulative = probs.cumsum(0)
            pick = torch.searchsorted(cumulative, uniforms[row].clamp(0, 1 - 1e-7) * cumulative[-1:], right=True)
            tokens.append(int(pick.clamp(max=len(probs) - 1)))
            continue
        ranked, order = torch.sort(probs, descending=True)
        cumulative = ranked.cumsum(0)
        ranked = ranked.masked_fill((cumulative - ranked) >= top_ps[row], 0.0)
        cumulative = ranked.cumsum(0)
        pick = torch.searchsorted(cumulative, uniforms[row].clamp(0, 1 - 1e-7) * cumulative[-1:], right=True)
        tokens.append(int(order[pick.clamp(max=len(order) - 1)]))
    tokens = torch.tensor(tokens)
    return tokens, raw.gather(1, tokens.unsqueeze(1)).squeeze(1)


def test_the_fast_paths_pick_what_a_full_sort_picks_on_a_real_vocabulary_size():
    """Greedy rows skip the distribution, top-p rows search the 1,024 most likely tokens first, and
    a flat row (whose 1,024 best hold less than top_p) is sorted in full: the same tokens as the
    rule computed row by row, in a batch mixing all of them. (Before, one top-p row in a batch sent
    every row through the sort, so a top_p=1 row's token depended on what else shared its batch.)"""
    generator = torch.Generator().manual_seed(0)
    vocab, rows = 49152, 24
    logits = torch.randn(rows, vocab, generator=generator) * 4
    logits[3] = torch.randn(vocab, generator=generator) * 0.01  # nearly flat: top-1024 holds ~2% of the mass
    logits[4] = 0.0  # exactly flat
    temperatures = torch.tensor([0.0, 0.8, 1.0, 1.0, 1.0, 0.5] * 4)
    top_ps = torch.tensor([1.0, 0.95, 0.9, 0.95, 0.5, 1.0, 0.3, 0.99] * 3)
    uniforms = torch.rand(rows, generator=generator)
    tokens, logprobs = sample_tokens(logits, temperatures, top_ps, uniforms)
    expected_tokens, expected_logprobs = reference_sample_tokens(logits, temperatures, top_ps, uniforms)
    assert tokens.tolist() == expected_tokens.tolist()
    assert torch.allclose(logprobs, expected_logprobs, atol=1e-5)
    assert tokens[0] == logits[0].argmax()  # greedy
