import time, torch
from manip_bench import attributors, models
from manip_bench.patterns import estimate_patterns
print(torch.__version__, torch.cuda.is_available())
torch.manual_seed(0)
batches = [torch.rand(200, 3, 32, 32) for _ in range(10)]
m = models.load("cifar_vgg")
t = time.time(); cpu = estimate_patterns(m, batches, progress=False); print("cpu", time.time() - t)
g = models.load("cifar_vgg", device="cuda")
t = time.time(); gpu = estimate_patterns(g, batches, progress=False); torch.cuda.synchronize(); print("gpu", time.time() - t)
for k in cpu:
    print(k, ((cpu[k] - gpu[k]).norm() / cpu[k].norm()).item(), gpu[k].device)
x = torch.rand(4, 3, 32, 32)
ex_c = attributors.create("pattern.attribution", m, patterns=cpu)
ex_g = attributors.create("pattern.attribution", g, patterns=cpu)
rc = ex_c(x, 3)[1]; xg = x.cuda().requires_grad_(); rg = ex_g(xg, 3)[1]
print("map rel err", ((rc - rg.cpu()).norm() / rc.norm()).item())
(gr,) = torch.autograd.grad(rg.square().sum(), xg); print("grad finite", torch.isfinite(gr).all().item(), gr.abs().sum().item() > 0)
t = time.time(); big = [torch.rand(500, 3, 32, 32) for _ in range(100)]
estimate_patterns(g, big, progress=False); torch.cuda.synchronize(); print("gpu 50k random images", time.time() - t)
