//! A small file system that tests can fill up: a tmpfs of a few megabytes, for the storage
//! fault tests. SQLite gets its data dir on it; PostgreSQL gets a database whose tablespace is
//! on it (the server is local). Mounting needs root, as CI runs; elsewhere the test fails and
//! says so rather than pass without checking anything.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use diesel::{Connection, PgConnection, RunQueryDsl};

/// A tmpfs mounted for one test, unmounted when dropped.
pub struct SmallDisk {
    /// Holds the mount point; world-traversable so the PostgreSQL server can reach into it.
    base: tempfile::TempDir,
    filler: PathBuf,
}

impl SmallDisk {
    /// Mounts `megabytes` of tmpfs, owned by `owner` (a user name) if given.
    pub fn mount(megabytes: u32, owner: Option<&str>) -> anyhow::Result<SmallDisk> {
        let base = tempfile::Builder::new().prefix("zt-disk-").tempdir()?;
        set_mode(base.path(), 0o755)?;
        let mount = base.path().join("fs");
        std::fs::create_dir(&mount)?;
        let mut options = format!("size={megabytes}m,mode=0700");
        if let Some(user) = owner {
            options.push_str(&format!(",uid={user},gid={user}"));
        }
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
            .arg(&mount)
            .status()
            .context("run mount")?;
        if !status.success() {
            bail!(
                "cannot mount a tmpfs at {} (this test needs root, as CI runs it): {status}",
                mount.display()
            );
        }
        Ok(SmallDisk {
            filler: mount.join("filler"),
            base,
        })
    }

    /// The mounted directory.
    pub fn path(&self) -> PathBuf {
        self.base.path().join("fs")
    }

    /// Fills every free byte with a file of its own.
    pub fn fill(&self) -> anyhow::Result<()> {
        let mut file = std::fs::File::create(&self.filler)?;
        let block = vec![0xa5_u8; 64 * 1024];
        loop {
            match file.write(&block) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => return Err(e.into()),
            }
        }
        // Byte by byte into the last block, so not even a small write fits.
        let byte = [0xa5_u8];
        while file.write(&byte).is_ok_and(|n| n == 1) {}
        Ok(())
    }

    /// Gives the space back.
    pub fn free(&self) -> anyhow::Result<()> {
        std::fs::remove_file(&self.filler)?;
        Ok(())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.path()).status();
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// A PostgreSQL database whose tablespace lives on a [`SmallDisk`] owned by the server's
/// user, so its tables run out of space when the disk is filled. Dropped with the value.
pub struct PostgresOnSmallDisk {
    admin_url: String,
    name: String,
    pub url: String,
    pub disk: SmallDisk,
}

impl PostgresOnSmallDisk {
    pub fn create(megabytes: u32) -> anyhow::Result<PostgresOnSmallDisk> {
        let disk = SmallDisk::mount(megabytes, Some("postgres"))?;
        let admin_url = crate::postgres_admin_url();
        let mut conn = PgConnection::establish(&admin_url)
            .with_context(|| format!("PostgreSQL at {admin_url} is unreachable"))?;
        let name = format!("zt_disk_{}", hex::encode(rand::random::<[u8; 6]>()));
        diesel::sql_query(format!(
            "CREATE TABLESPACE {name} LOCATION '{}'",
            disk.path().display()
        ))
        .execute(&mut conn)
        .context("create the tablespace (the PostgreSQL server must run on this machine)")?;
        diesel::sql_query(format!("CREATE DATABASE {name} TABLESPACE {name}"))
            .execute(&mut conn)?;
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b.to_string())
            .unwrap_or(admin_url.clone());
        Ok(PostgresOnSmallDisk {
            url: format!("{base}/{name}"),
            admin_url,
            name,
            disk,
        })
    }
}

impl Drop for PostgresOnSmallDisk {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&self.admin_url) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn);
            let _ = diesel::sql_query(format!("DROP TABLESPACE IF EXISTS {}", self.name))
                .execute(&mut conn);
        }
    }
}
