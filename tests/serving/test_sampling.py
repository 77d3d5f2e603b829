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
