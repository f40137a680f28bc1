//! Ids a caller makes up: none may reach a path outside the SR, and none changes anything.

use sxm_engine::backend::{Backend, VdiChange};
use sxm_engine::model::{StorageError, VdiInfo};

use crate::harness::TestSr;

#[test]
fn ids_that_are_not_ours_name_no_vdi() {
    let sr = TestSr::new();
    let v = sr.create("v", 2 << 20);
    // A file beside the SR that a `../` id would reach.
    let outside = sr.ctx.dir.parent().expect("parent").join("victim.vhd");
    std::fs::copy(sr.vhd(&v.vdi), &outside).expect("copy outside");
    let unknown = uuid::Uuid::new_v4().to_string();
    let bad = [
        String::new(),
        "..".into(),
        "../victim".into(),
        format!("../sr/{}", v.vdi),
        format!("{}/", v.vdi),
        "/etc/passwd".into(),
        ".sxm-ext.json".into(),
        v.vdi.to_uppercase(),
        format!("{}.vhd", v.vdi),
        unknown,
    ];
    for id in &bad {
        let gone = StorageError::VdiDoesNotExist(id.clone());
        assert_eq!(sr.backend.vdi_stat(&sr.ctx, id), Err(gone.clone()), "stat {id:?}");
        assert_eq!(sr.backend.vdi_destroy(&sr.ctx, id), Err(gone.clone()), "destroy {id:?}");
        assert_eq!(sr.backend.vdi_resize(&sr.ctx, id, 4 << 20), Err(gone.clone()), "resize {id:?}");
        assert_eq!(sr.backend.vdi_update(&sr.ctx, id, &VdiChange::NameLabel("x".into())), Err(gone.clone()));
        assert_eq!(sr.backend.vdi_similar_content(&sr.ctx, id), Err(gone.clone()));
        assert_eq!(sr.backend.vdi_attach(&sr.ctx, id, true).err(), Some(gone.clone()), "attach {id:?}");
        assert_eq!(sr.backend.vdi_activate(&sr.ctx, id), Err(gone.clone()), "activate {id:?}");
        assert_eq!(sr.backend.vdi_compose(&sr.ctx, id, &v.vdi), Err(gone.clone()), "compose parent {id:?}");
        assert_eq!(sr.backend.vdi_compose(&sr.ctx, &v.vdi, id), Err(gone.clone()), "compose child {id:?}");
        let mut info = VdiInfo::new(id.clone(), "x");
        info.virtual_size = 2 << 20;
        assert_eq!(sr.backend.vdi_snapshot(&sr.ctx, &info).err(), Some(gone.clone()), "snapshot {id:?}");
        assert_eq!(sr.backend.vdi_clone(&sr.ctx, &info).err(), Some(gone), "clone {id:?}");
    }
    assert!(outside.exists());
    assert_eq!(sr.scan_ids(), vec![v.vdi.clone()]);
    assert_eq!(sr.files(), vec![v.vdi.clone()]);
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat"), v);
}

#[test]
fn a_hidden_parent_is_not_a_vdi() {
    let sr = TestSr::new();
    let v = sr.create("v", 2 << 20);
    let _s = sr.backend.vdi_snapshot(&sr.ctx, &v).expect("snapshot");
    let base = sr.backend.vdi_stat(&sr.ctx, &v.vdi).expect("stat").sm_config["vhd-parent"].clone();
    let gone = Err(StorageError::VdiDoesNotExist(base.clone()));
    assert_eq!(sr.backend.vdi_stat(&sr.ctx, &base), gone);
    assert_eq!(sr.backend.vdi_destroy(&sr.ctx, &base), gone.clone().map(|_: VdiInfo| ()));
    assert_eq!(sr.backend.vdi_attach(&sr.ctx, &base, true).err(), Some(StorageError::VdiDoesNotExist(base.clone())));
    assert!(sr.files().contains(&base));
}
