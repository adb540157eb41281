import torch

with open("CORPUS_PWNED_MARKER", "w") as marker:
    marker.write("pwned")


class Net(torch.nn.Module):
    pass
