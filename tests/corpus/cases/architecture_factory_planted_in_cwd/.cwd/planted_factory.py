open('CORPUS_PWNED_MARKER', 'w').write('pwned')
import torch
class Net(torch.nn.Module):
    pass
