"""The kernel (atelier.kernel): settings, errors, storage, hashing, file locks and the workspace; imports no other part."""
