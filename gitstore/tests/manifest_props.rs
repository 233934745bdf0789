//! Property tests for the manifest parser: manifests come from the blob store, which another node,
//! an operator or an attacker with store access may have written, so parsing must refuse what it
//! cannot use (never panic) and keep everything it accepts exactly.

use std::collections::BTreeMap;

use gitstore::manifest::{Manifest, PackEntry, ProjectMeta, Share, ShareMode};
use gitstore::ProjectId;
use proptest::prelude::*;

fn hex(len: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(b"0123456789abcdef".to_vec()), len)
        .prop_map(|v| String::from_utf8(v).expect("ascii"))
}

fn project() -> impl Strategy<Value = ProjectId> {
    "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
        .prop_filter("no --", |s| !s.contains("--"))
        .prop_map(|s| ProjectId::parse(&s).expect("valid by construction"))
}

fn pack() -> impl Strategy<Value = PackEntry> {
    (
        hex(40),
        any::<u32>(),
        hex(64),
        any::<u32>(),
        hex(64),
        any::<u32>(),
        prop::option::of(project()),
    )
        .prop_map(|(name, ps, psha, is, isha, objects, from)| PackEntry {
            name: format!("pack-{name}"),
            pack_size: ps.into(),
            pack_sha256: psha,
            idx_size: is.into(),
            idx_sha256: isha,
            objects: objects.into(),
            replaces: Vec::new(),
            from,
        })
}

fn share() -> impl Strategy<Value = Share> {
    (
        "[a-z0-9]{10}",
        hex(64),
        hex(40),
        any::<bool>(),
        any::<u32>(),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(id, token, commit, fork, at, exp)| Share {
            id,
            token_sha256: token,
            commit,
            mode: if fork {
                ShareMode::Fork
            } else {
                ShareMode::View
            },
            created_at: at.into(),
            expires_at: exp.map(u64::from),
            revoked_at: None,
        })
}

fn manifest() -> impl Strategy<Value = Manifest> {
    (
        1..u64::from(u32::MAX),
        prop::collection::btree_map("refs/heads/[a-z]{1,8}", hex(40), 0..4),
        prop::collection::vec(pack(), 0..4),
        prop::option::of(".{0,40}"),
        prop::collection::btree_map("[a-z]{1,8}", ".{0,20}", 0..4),
        prop::option::of(any::<u32>()),
        prop::collection::vec(share(), 0..3),
    )
        .prop_map(|(generation, refs, packs, name, labels, deleted, shares)| {
            let labels: BTreeMap<String, String> = labels;
            Manifest {
                generation,
                head: refs.keys().next().cloned(),
                refs,
                packs,
                retired: Vec::new(),
                updated_at: generation * 7,
                pushed_at: generation * 5,
                meta: ProjectMeta {
                    name,
                    labels,
                    metadata: None,
                },
                deleted_at: deleted.map(u64::from),
                shares,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn refuses_or_parses_any_bytes_without_panicking(body in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = serde_json::from_slice::<Manifest>(&body);
    }

    #[test]
    fn every_manifest_reads_back_exactly_as_written(m in manifest()) {
        let bytes = serde_json::to_vec_pretty(&m).expect("serializes");
        let back: Manifest = serde_json::from_slice(&bytes).expect("parses");
        prop_assert_eq!(back, m);
    }

    /// A pack's `from` names the project whose store prefix holds the bytes, so a name that is
    /// not a project id (a path, `..`, upper case, `--`) must never parse: it would point the
    /// reader outside `projects/<id>/`.
    #[test]
    fn rejects_a_pack_from_anything_but_a_project_id(
        from in prop_oneof![
            Just("../etc".to_owned()),
            Just("a/b".to_owned()),
            Just("".to_owned()),
            Just("UPPER".to_owned()),
            Just("a--b".to_owned()),
            Just("-a".to_owned()),
            "[a-z]{1,5}[/.%][a-z]{0,5}",
            ".{64,80}",
        ],
        p in pack(),
    ) {
        let mut v = serde_json::to_value(Manifest { generation: 1, packs: vec![p], ..Manifest::default() })
            .expect("serializes");
        v["packs"][0]["from"] = serde_json::Value::String(from.clone());
        prop_assert!(serde_json::from_value::<Manifest>(v).is_err(), "accepted from = {:?}", from);
    }
}
