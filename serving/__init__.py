"""The policy serving application (Ray Serve + vLLM): OpenAI endpoint, rollout hot path, versioned weight hot-swap.

Entry points live in `serving.app` (build_policy_app, start_policy_server, stop_policy_server, serve_main). This
package imports nothing heavy on import; its modules import Ray Serve / vLLM themselves.
"""
