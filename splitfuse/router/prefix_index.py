"""Which replica holds how much of a prompt's prefix: an exact index from KV events, or an approximate radix tree.

``PreciseBlockIndex`` mirrors each replica's prefix cache from its ``BlockStored`` / ``BlockRemoved``
events (``engine/protocol.py``); it is exact as far as the events have arrived. ``ApproximateTree``
serves backends that send no events: it remembers what the router itself sent where, over token
ids or over the characters of the prompt text, and forgets the least recently routed prefixes
first once it holds ``max_entries``.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Iterator, Optional, Sequence, Union

from splitfuse.engine.kv_cache.hashing import BlockHash, hash_block
from splitfuse.engine.protocol import BlockRemoved, BlockStored

# A routing key: a prompt's token ids, or its text (one element per character).
KeySequence = Union[Sequence[int], str]


class PreciseBlockIndex:
    """Each replica's cached block hashes, from its KV events; ``matched_blocks`` counts a prompt's leading hits.

    Chained hashes (``hash_block(parent, tokens)``) make "replica holds block i's hash" mean it
    holds the KV of the whole prefix up to block i, so a prompt's match on a replica is the run of
    its leading block hashes that the replica holds, computed with the engine's own block size.

    A replica holds a hash while its stores outnumber its removals: our engine stores a hash once,
    a backend that keeps duplicate copies sends one event per copy. A removal of a hash never
    stored is ignored (it was stored before the router subscribed).

    Cost: ``on_kv_events`` O(hashes in the events); ``matched_blocks`` hashes the prompt block by
    block and stops at the first block no replica holds, O(hashed tokens + matched blocks x
    replicas); ``forget_replica`` O(hashes that replica holds).
    """

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.num_events_seen = 0  # the cache-aware policy trusts this index only once events arrive
        self._copies: dict[BlockHash, dict[str, int]] = {}  # hash -> replica -> copies it holds
        self._hashes_by_replica: dict[str, set[BlockHash]] = {}

    def on_kv_events(self, replica_id: str, events: Sequence[Union[BlockStored, BlockRemoved]]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                for block_hash in event.block_hashes:
                    self._store(replica_id, block_hash)
            elif isinstance(event, BlockRemoved):
                for block_hash in event.block_hashes:
                    self._remove(replica_id, block_hash)
            else:
                raise TypeError(f"unknown KV event {type(event).__name__} from replica {replica_id!r}")
            self.num_events_seen += 1

    def matched_blocks(self, token_ids: Sequence[int]) -> dict[str, int]:
        """Replica -> number of leading full blocks of ``token_ids`` it holds; replicas holding none are absent."""
        matched: dict[str, int] = {}
        holders: Optional[set[str]] = None  # replicas that hold every block so far
        parent: Optional[BlockHash] = None
        for block_index in range(len(token_ids) // self.block_size):
            start = block_index * self.block_size
            block_hash = hash_block(parent, token_ids[start:start + self.block_size])
            held_by = self._copies.get(block_hash)
            if not held_by:
                break
            holders = set(held_by) if holders is None else holders.intersection(held_by)
            if not holders:
                break
            for replica_id in holders:
                matched[replica_id] = block_index + 1
            parent = block_hash
        return matched

    def forget_replica(self, replica_id: str) -> None:
        for block_hash in self._hashes_by_replica.pop(replica_id, set()):
            held_by = self._copies[block_hash]
            del held_by[replica_id]
            if not held_by:
                del self._copies[block_hash]

    def _store(self, replica_id: str, block_hash: BlockHash) -> None:
        held_by = self._copies.setdefault(block_hash, {})
        held_by[replica_id] = held_by.get(replica_id, 0) + 1
        self._hashes_by_replica.setdefault(replica_id, set()).add(block_hash)

    def _remove(self, replica_id: str, block_hash: BlockHash) -> None:
        held_by = self._copies.get(block_hash)
        if held_by is None or replica_id not in held_by:
            return
        held_by[replica_id] -= 1
        if held_by[replica_id] == 0:
            del held_by[replica_id]
            self._hashes_by_replica[replica_id].discard(block_hash)
            if not held_by:
                del self._copies[block_hash]


class _Node:
    """One edge of the radix tree and the replicas that were sent the prefix ending here."""

    __slots__ = ("key", "children", "parent", "end", "last_routed")

    def __init__(self, key: KeySequence, parent: Optional[_Node], end: int) -> None:
        self.key = key  # this edge's key elements, from the parent down to here
        self.children: dict[object, _Node] = {}  # first key element of the child's edge -> child
        self.parent = parent  # None once the node is cut from the tree (and for the root)
        self.end = end  # length of the whole prefix from the root to the end of this edge
        self.last_routed: dict[str, int] = {}  # replica -> tick of the last insert through here


class ApproximateTree:
    """A radix tree of the prefixes the router sent to each replica; ``match`` gives each one's longest shared prefix.

    Keys are token ids or text (characters); the two never share a branch, since an int never
    equals a one-character string. A replica on a node is on all its ancestors (it was sent the
    whole prefix), so its match is how far down the prompt's path it appears.

    Size: ``num_entries`` counts (replica, key element) pairs, so a prefix sent to two replicas
    counts twice. Past ``max_entries`` the least recently routed leaf of some replica (a node it
    holds and none of whose children it holds) loses that replica, and nodes left with no replica
    are cut. Recency is the tick of the last ``insert`` through a node: ``match`` does not refresh it.
    Every insert stamps its whole path, so a descendant is never more recent than its ancestor for
    the same replica; a heap ordered by (tick, deeper first) therefore always pops a leaf first.

    Cost: ``insert`` O(key length + path nodes x log heap); ``match`` O(key length + path nodes x
    replicas); ``forget_replica`` O(tree nodes). Stale heap entries are skipped on pop, and the
    heap is rebuilt from the tree when it grows past twice the live entries. Edges left with a
    single child after an eviction are not merged back: matching stays correct, only a little
    slower.
    """

    def __init__(self, max_entries: int = 1 << 20) -> None:
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.max_entries = max_entries
        self.num_entries = 0
        self._root = _Node("", None, 0)
        self._tick = 0
        self._num_pairs = 0  # (node, replica) pairs: the live entries of the heap
        self._heap: list[tuple[int, int, int, _Node, str]] = []  # (tick, -end, seq, node, replica)
        self._seq = itertools.count()  # only to keep tuples from comparing nodes

    def insert(self, key_sequence: KeySequence, replica_id: str) -> None:
        """Records that the prompt ``key_sequence`` was sent to ``replica_id`` (longer than max_entries: its head)."""
        key = _normalized(key_sequence)[: self.max_entries]
        if not key:
            return
        self._tick += 1
        node, position, path = self._root, 0, []
        while position < len(key):
            child = node.children.get(key[position])
            if child is None:
                child = _Node(key[position:], node, len(key))
                node.children[key[position]] = child
                path.append(child)
                break
            common = _common_prefix_length(child.key, key, position)
            if common < len(child.key):
                child = self._split(child, common)
            path.append(child)
            node, position = child, position + common
        for node in path:
            if replica_id not in node.last_routed:
                self.num_entries += len(node.key)
                self._num_pairs += 1
            node.last_routed[replica_id] = self._tick
            self._push(node, replica_id)
        self._evict_down_to(self.max_entries)
        if len(self._heap) > 2 * self._num_pairs + 1024:
            self._rebuild_heap()

    def match(self, key_sequence: KeySequence) -> dict[str, int]:
        """Replica -> length of the longest prefix of ``key_sequence`` it was sent; replicas with none are absent."""
        key = _normalized(key_sequence)
        matched: dict[str, int] = {}
        node, position = self._root, 0
        while position < len(key):
            child = node.children.get(key[position])
            if child is None:
                break
            common = _common_prefix_length(child.key, key, position)
            for replica_id in child.last_routed:  # a subset of the parent's: deeper overwrites
                matched[replica_id] = position + common
            if common < len(child.key):
                break
            node, position = child, position + common
        return matched

    def forget_replica(self, replica_id: str) -> None:
        for node in list(self._nodes()):
            if replica_id in node.last_routed:
                self._drop(node, replica_id)

    def _split(self, node: _Node, at: int) -> _Node:
        """Cuts ``node``'s edge after ``at`` elements; returns the new upper node, which holds what ``node`` held."""
        upper = _Node(node.key[:at], node.parent, node.end - len(node.key) + at)
        upper.last_routed = dict(node.last_routed)
        upper.children[node.key[at]] = node
        node.parent.children[node.key[0]] = upper
        node.key = node.key[at:]
        node.parent = upper
        self._num_pairs += len(upper.last_routed)
        for replica_id in upper.last_routed:
            self._push(upper, replica_id)
        return upper

    def _push(self, node: _Node, replica_id: str) -> None:
        entry = (node.last_routed[replica_id], -node.end, next(self._seq), node, replica_id)
        heapq.heappush(self._heap, entry)

    def _evict_down_to(self, limit: int) -> None:
        while self.num_entries > limit:
            tick, _, _, node, replica_id = heapq.heappop(self._heap)
            if node.parent is not None and node.last_routed.get(replica_id) == tick:
                self._drop(node, replica_id)

    def _drop(self, node: _Node, replica_id: str) -> None:
        del node.last_routed[replica_id]
        self.num_entries -= len(node.key)
        self._num_pairs -= 1
        if not node.last_routed:  # then no child has a replica either: it is a leaf
            if node.parent is not None:
                del node.parent.children[node.key[0]]
            node.parent = None

    def _rebuild_heap(self) -> None:
        self._heap = [(tick, -node.end, next(self._seq), node, replica_id)
                      for node in self._nodes() for replica_id, tick in node.last_routed.items()]
        heapq.heapify(self._heap)

    def _nodes(self) -> Iterator[_Node]:
        """Every node below the root, parents before children."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


def _normalized(key_sequence: KeySequence) -> KeySequence:
    # Edges are list slices or str slices; a tuple key would never compare equal to a list edge.
    return key_sequence if isinstance(key_sequence, (str, list)) else list(key_sequence)


def _common_prefix_length(edge: KeySequence, key: KeySequence, start: int) -> int:
    """How many leading elements of ``edge`` equal ``key[start:]``'s."""
    window = key[start:start + len(edge)]
    if window == edge:  # the usual case, compared in C
        return len(edge)
    length = 0
    for edge_element, key_element in zip(edge, window):
        if edge_element != key_element:
            break
        length += 1
    return length
