"""The Git credentials of a pipeline: stored secrets with conventional names, the pipeline's own
over its organization's (`GIT_SSH_KEY`, `GIT_SSH_KNOWN_HOSTS`, `GIT_TOKEN`, `GIT_USERNAME`)."""

from __future__ import annotations

from infra.git.files import GitCredential, GitError
from infra.secrets import SecretsUnavailable
from infra.stored_secrets import StoredSecrets

SSH_KEY = "GIT_SSH_KEY"
SSH_KNOWN_HOSTS = "GIT_SSH_KNOWN_HOSTS"
TOKEN = "GIT_TOKEN"
USERNAME = "GIT_USERNAME"


class StoredGitCredentials:
    """The GitCredentials port over stored secrets."""

    def __init__(self, stored: StoredSecrets) -> None:
        self._stored = stored

    async def for_pipeline(self, organization_id: str | None, pipeline_id: str) -> GitCredential | None:
        try:
            values = await self._stored.values_for(
                organization_id, pipeline_id, names=(SSH_KEY, SSH_KNOWN_HOSTS, TOKEN, USERNAME)
            )
        except SecretsUnavailable as exc:
            raise GitError(str(exc)) from None
        if not values.get(SSH_KEY) and not values.get(TOKEN):
            return None
        return GitCredential(
            ssh_key=values.get(SSH_KEY) or None,
            ssh_known_hosts=values.get(SSH_KNOWN_HOSTS) or None,
            token=values.get(TOKEN) or None,
            username=values.get(USERNAME) or "x-access-token",
        )
