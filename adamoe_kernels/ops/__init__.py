"""Layer 1 of the package (see ``docs/architecture.md``): everything that runs a kernel.

* ``backend.py``: which backend runs a call (``triton``, ``cpu``, ``torch``) and whether each is there;
* ``routing.py``, ``grouped_mlp.py``, ``lora.py``: launchers, autograd and ``torch.library``
  registration of the Triton kernels in ``adamoe_kernels.kernels``;
* ``cpu.py``: autograd and fake kernels of the C++ ops of ``adamoe_kernels._C``;
* ``_common.py``: kernel configs and output allocation shared by the launchers.

Nothing here validates user input or imports the public API: ``adamoe_kernels.routing`` / ``moe``
/ ``lora`` check the arguments and then call in here.
"""
