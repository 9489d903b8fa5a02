import os

import torch

# every core, unless OMP_NUM_THREADS says otherwise (on a loaded 2-core machine two threads
# oversubscribe it and time the scheduler, not the kernel: OMP_NUM_THREADS=1 gives stable figures)
_env = os.environ.get("OMP_NUM_THREADS", "")
torch.set_num_threads(int(_env) if _env.isdigit() and int(_env) > 0 else max(1, os.cpu_count() or 1))
