"""The runtime never imports torch, even indirectly."""

import subprocess
import sys

RUNTIME_MODULES = [
    "tinysam_rt", "tinysam_rt.errors", "tinysam_rt.atomic", "tinysam_rt.manifest", "tinysam_rt.preprocess",
    "tinysam_rt.sessions", "tinysam_rt.embedding", "tinysam_rt.prompts", "tinysam_rt.postprocess",
    "tinysam_rt.predictor", "tinysam_rt.io", "tinysam_rt.cli",
]

# torch (and friends) are made unimportable: any import of them fails loudly.
BLOCKER = """
import sys, importlib, pkgutil
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'segment_anything', 'mobile_sam', 'timm'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import tinysam_rt
for info in pkgutil.iter_modules(tinysam_rt.__path__):
    importlib.import_module('tinysam_rt.' + info.name)
for name in {modules!r}:
    importlib.import_module(name)
from tinysam_rt import TinySAMPredictor
bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'segment_anything')]
assert not bad, bad
print('ok')
"""


def test_import_every_runtime_module_without_torch():
    code = BLOCKER.format(modules=RUNTIME_MODULES)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_plain_import_leaves_torch_out():
    code = "import tinysam_rt, sys; from tinysam_rt import TinySAMPredictor; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
