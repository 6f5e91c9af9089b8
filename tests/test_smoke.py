import numpy as np

from arraygpt import GPT, GPTConfig


def test_microgpt_forward_backward_shapes():
    model = GPT(GPTConfig.preset("microgpt"), seed=0)
    logits, loss = model.forward(np.array([[0, 5, 3, 7]]), targets=np.array([[5, 3, 7, 0]]))
    assert logits.shape == (1, 4, 27)
    assert abs(loss - np.log(27)) < 0.2  # near-uniform at init
    grads = model.backward()
    assert {k: tuple(v.shape) for k, v in grads.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
