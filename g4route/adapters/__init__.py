"""Adapters that put ``g4route.route`` inside other libraries' Gemma 4 MoE layers.

- ``g4route.adapters.vllm``: ``make_vllm_routing_function(per_expert_scale)``, a ``custom_routing_function``
  for vLLM's ``FusedMoE`` (imports nothing from vLLM).
- ``g4route.adapters.transformers``: ``patch_gemma4(model)``, which makes a Hugging Face Gemma 4 MoE model
  route through g4route, with ``undo()`` (needs the ``transformers`` package).

Neither library is a dependency of g4route: each adapter imports only what it uses, when it is called.
"""
