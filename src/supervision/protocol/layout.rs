//! What a committed checkpoint records of the job that wrote it (manifest `extra` keys: world
//! size, per-rank files, sharded, reshardable), and how it is read back ([`world_of`]) by the
//! trainer, `status` and a resume with another world size.

/// Manifest `extra` key: the number of ranks that wrote a multi-rank checkpoint (absent: 1).
pub const EXTRA_WORLD_SIZE: &str = "world_size";
/// Manifest `extra` key: how per-rank files are named.
pub const EXTRA_RANK_FILES: &str = "rank_files";
/// Manifest `extra` key: a rank said its files are a shard (they load only with the same
/// world size, unless the program reshards).
pub const EXTRA_SHARDED: &str = "sharded";

/// Manifest `extra` key: every rank said its state is in a format whose reader reshards it
/// (torch.distributed.checkpoint): the checkpoint loads with any world size.
pub const EXTRA_RESHARDABLE: &str = "reshardable";

/// How the ranks' state of one commit is laid out (from their requests, into the manifest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sharding {
    /// Some rank's files are a shard of the state.
    pub sharded: bool,
    /// Every rank's state is reshardable by its reader (DCP).
    pub reshardable: bool,
}

/// What a manifest records of the ranks that wrote its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedWorld {
    /// The number of ranks (1 for a 1-rank checkpoint).
    pub world: u32,
    pub sharding: Sharding,
}

impl SavedWorld {
    /// The state loads only with the world size that wrote it (sharded, not reshardable).
    pub fn pinned(&self) -> bool {
        self.sharding.sharded && !self.sharding.reshardable
    }
}

/// The world size and sharding a manifest records.
pub fn world_of(manifest: &crate::storage::Manifest) -> SavedWorld {
    let flag = |k: &str| {
        manifest
            .extra
            .get(k)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    };
    let world = manifest
        .extra
        .get(EXTRA_WORLD_SIZE)
        .and_then(|v| v.as_u64())
        .map_or(1, |w| w as u32);
    SavedWorld {
        world,
        sharding: Sharding {
            sharded: flag(EXTRA_SHARDED),
            reshardable: flag(EXTRA_RESHARDABLE),
        },
    }
}
