"""The Redis key layout that the server writes and the learner reads.

Every key starts with one prefix (after the `{` of its hash tag where it has one), so
two deployments can share a Redis. Stream entries have one field, DATA_FIELD, holding a
serialized record from instructloop.v1.records_pb2. Nothing is trimmed from a stream
before the learner has acknowledged it.

Hash tags: in a Redis Cluster a Lua script or MULTI/EXEC must touch keys of one hash
slot, and only the text inside a key's first `{...}` is hashed. The keys fall in three
groups, each with its own tag, and no script or transaction mixes two groups:

  data path  `{PREFIX}:...`           the prompts and feedback streams, prompt records,
                                      judgements, idempotency keys and the labeling
                                      queue (the prompt-log MULTI enqueues, the feedback
                                      script closes a lease): one slot
  registry   `{PREFIX:registry}:...`  versions, aliases, freeze, canary, audit stream,
                                      heartbeats, the rolling-swap turn and the events
                                      channel (sharded pub/sub in a cluster): one slot
  users      `{PREFIX:users}:...`     users, credentials, quality, agreement: one slot

Keys used alone stay untagged and spread over the cluster: the learner's lease and the
rate limiter's windows (one key per user and limit). So one deployment's data path lives
on one master (its throughput is one master's); the registry and users groups may sit on
others, and several prefixes (deployments) spread over the masters.

The layout before the tags had every key as `PREFIX:...` (the same suffixes);
`legacy_renames` lists the old names for the migration (instructloop/migrate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

DATA_FIELD = b"data"
QUEUE_SKIPS_MAXLEN = 10_000  # entries kept in the queue_skips stream (approximately)


@dataclass(frozen=True)
class Keys:
    prefix: str = "instructloop"

    # ---- hash tags (the module docstring says which key is in which group) -----------

    @property
    def data_tag(self) -> str:
        return f"{{{self.prefix}}}"

    @property
    def registry_tag(self) -> str:
        return f"{{{self.prefix}:registry}}"

    @property
    def users_tag(self) -> str:
        return f"{{{self.prefix}:users}}"

    @property
    def prompts_stream(self) -> str:
        """Stream of PromptRecord: every logged Generate call."""
        return f"{self.data_tag}:stream:prompts"

    @property
    def feedback_stream(self) -> str:
        """Stream of FeedbackRecord: every accepted judgement."""
        return f"{self.data_tag}:stream:feedback"

    def prompt(self, prompt_id: str) -> str:
        """A PromptRecord by id, kept for the feedback window (its TTL)."""
        return f"{self.data_tag}:prompt:{prompt_id}"

    def judgement(self, prompt_id: str, user_id: str, kind: str) -> str:
        """The feedback id of a user's one judgement of a prompt. kind is "comparison"
        (ranking, choice or rating) or "demonstration": a user may do one of each."""
        return f"{self.data_tag}:judged:{prompt_id}:{user_id}:{kind}"

    def idempotency(self, user_id: str, key: str) -> str:
        """'<content hash> <feedback id>' for a client-chosen idempotency key. The user id's
        length comes first, so no (user, key) pair shares a key with another: user "a"
        with key "b:c" is idem:1:a:b:c, user "a:b" with key "c" is idem:3:a:b:c."""
        return f"{self.data_tag}:idem:{len(user_id)}:{user_id}:{key}"

    @property
    def learner_lease(self) -> str:
        """The single learner's lease: '<holder> <suffix>', with a TTL it keeps renewing."""
        return f"{self.prefix}:learner:lease"

    # ---- labeling queue (serve/queue.py) ----------------------------------------------
    # A share of logged prompts with n >= 2 (--queue-share) becomes a queue item, in the
    # same MULTI as its log entry; NextTask leases items to labelers, SkipTask gives them
    # back, a comparison closes the judge's lease. Bounds: the waiting set holds at most
    # --queue-max items (enqueueing beyond it drops the oldest, with their hashes); an
    # item's hash expires with its prompt (the prompt's TTL) and is deleted when
    # --queue-overlap labelers judged it, when it is dropped as unrankable, or when it is
    # dropped as the oldest; the scripts remove an expired item's ids when they meet
    # them. Each labeler holds at most one lease, so the lease set is at most one entry per
    # labeler. The scripts derive an item's key from its prompt id (the prefixes below):
    # a Redis Cluster allows it because every such key has the data path's hash tag.

    @property
    def queue_waiting(self) -> str:
        """Sorted set: prompt id -> enqueue time (ms), the items with a free place (handed
        to fewer than their overlap labelers whose leases are live or who judged them)."""
        return f"{self.data_tag}:queue:waiting"

    @property
    def queue_leases(self) -> str:
        """Sorted set: '<prompt id> <user>' -> lease expiry (ms), every live lease (and
        expired ones until NextTask reclaims them)."""
        return f"{self.data_tag}:queue:leases"

    @property
    def queue_item_prefix(self) -> str:
        return f"{self.data_tag}:queue:item:"

    def queue_item(self, prompt_id: str) -> str:
        """Hash of one item: owner (the prompt's user), at (enqueue ms), need (overlap),
        taken (live leases + judgements), done (judgements), cannot (cannot-rank count),
        leases (lease counter), and per labeler who touched it `u:USER` -> 'L <n> <expiry
        ms>' (leased), 'X <n>' (lease expired), 'S <n>' (skipped), 'C <n>' (cannot rank)
        or 'J' (judged). TTL: its prompt's."""
        return f"{self.queue_item_prefix}{prompt_id}"

    @property
    def queue_lease_of_prefix(self) -> str:
        return f"{self.data_tag}:queue:lease:"

    def queue_lease_of(self, user_id: str) -> str:
        """'<prompt id> <lease number> <expiry ms>': the one live lease a labeler holds,
        expiring with it (NextTask returns it again while it is live)."""
        return f"{self.queue_lease_of_prefix}{user_id}"

    @property
    def queue_skips(self) -> str:
        """Stream of SkipTaskRequest (user_id filled in): every skip and cannot-rank, with
        its reason, for operators; capped at about QUEUE_SKIPS_MAXLEN entries."""
        return f"{self.data_tag}:stream:queue_skips"

    # ---- users (instructloop/users.py) -------------------------------------------------

    @property
    def users(self) -> str:
        """Hash: user id -> serialized admin_pb2.UserInfo (role, revoked, suspended)."""
        return f"{self.users_tag}:users"

    @property
    def credentials(self) -> str:
        """Hash: SHA-256 (hex) of a user's token -> user id. Tokens are never stored."""
        return f"{self.users_tag}:credentials"

    @property
    def credential_of(self) -> str:
        """Hash: user id -> SHA-256 (hex) of its token (to revoke it)."""
        return f"{self.users_tag}:credential_of"

    @property
    def user_quality(self) -> str:
        """Hash: user id -> serialized admin_pb2.UserQuality, replaced by each round."""
        return f"{self.users_tag}:user_quality"

    @property
    def labeler_agreement(self) -> str:
        """Hash: the latest round's inter-labeler agreement and its pair count."""
        return f"{self.users_tag}:labeler_agreement"

    def rate_prefix(self) -> str:
        """Prefix of the rate limiter's keys (one per user, kind and window)."""
        return f"{self.prefix}:rate"

    # ---- model registry ----------------------------------------------------------------

    @property
    def versions(self) -> str:
        """Hash: version id -> serialized admin_pb2.VersionInfo."""
        return f"{self.registry_tag}:versions"

    @property
    def version_seq(self) -> str:
        """Counter that allocates version ids (v1, v2, ...)."""
        return f"{self.registry_tag}:version_seq"

    @property
    def aliases(self) -> str:
        """Hash: alias ("current", "previous", "canary") -> version id."""
        return f"{self.registry_tag}:aliases"

    @property
    def freeze(self) -> str:
        """Serialized admin_pb2.FreezeState while automatic promotion is frozen."""
        return f"{self.registry_tag}:freeze"

    @property
    def canary(self) -> str:
        """Hash: the canary's share, promote_at, rollback_at, min_comparisons, and its
        live outcomes against current (wins, losses, ties)."""
        return f"{self.registry_tag}:canary"

    @property
    def canary_users(self) -> str:
        """Set: the distinct users who judged the canary (deleted with the canary)."""
        return f"{self.registry_tag}:canary:users"

    @property
    def canary_judged(self) -> str:
        """Set: '<user> <prompt>' of every judgement counted for the canary, so each user's
        judgement of a prompt counts once (deleted with the canary)."""
        return f"{self.registry_tag}:canary:judged"

    @property
    def canary_decision(self) -> str:
        """String with a TTL: the replica deciding the canary now. A replica that dies
        while deciding leaves it to expire, and the next judgement decides."""
        return f"{self.registry_tag}:canary:decision"

    @property
    def audit_stream(self) -> str:
        """Stream of AuditRecord: every registry change, who, when, from and to."""
        return f"{self.registry_tag}:stream:audit"

    @property
    def events(self) -> str:
        """Pub/sub channel of RegistryEvent."""
        return f"{self.registry_tag}:events"

    @property
    def replicas(self) -> str:
        """Hash: replica id -> serialized admin_pb2.ReplicaStatus (heartbeats)."""
        return f"{self.registry_tag}:replicas"

    @property
    def swap_turn(self) -> str:
        """String with a TTL: '<replica> <token>' of the one replica taking a full-weight
        swap now (serve/swapturn.py). The holder renews it; a dead holder's turn expires."""
        return f"{self.registry_tag}:swap:turn"

    # ---- the layout before the hash tags (instructloop/migrate.py) ---------------------

    def legacy_renames(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """What the untagged layout called each key: (old name, new name) of every fixed
        key, and (old prefix, new prefix) of every family of per-id keys. Each old name
        is the new one with its hash tag `{...}` replaced by the bare prefix. The learner
        lease and the rate limiter's keys kept their names."""
        fixed = [
            self.prompts_stream,
            self.feedback_stream,
            self.queue_waiting,
            self.queue_leases,
            self.queue_skips,
            self.users,
            self.credentials,
            self.credential_of,
            self.user_quality,
            self.labeler_agreement,
            self.versions,
            self.version_seq,
            self.aliases,
            self.freeze,
            self.canary,
            self.canary_users,
            self.canary_judged,
            self.canary_decision,
            self.audit_stream,
            self.replicas,
        ]
        families = [
            self.prompt(""),
            f"{self.data_tag}:judged:",
            f"{self.data_tag}:idem:",
            self.queue_item_prefix,
            self.queue_lease_of_prefix,
        ]
        return (
            [(self._untagged(k), k) for k in fixed],
            [(self._untagged(p), p) for p in families],
        )

    def _untagged(self, key: str) -> str:
        for tag in (self.data_tag, self.registry_tag, self.users_tag):
            if key.startswith(tag + ":"):
                return self.prefix + key[len(tag) :]
        raise ValueError(f"{key!r} has none of this layout's hash tags")
