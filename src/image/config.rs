//! What an image's configuration says about the process it runs: the
//! command line (Kubernetes' and Docker's rule), the environment, the user
//! and its groups from the image's own `/etc/passwd` and `/etc/group`
//! (read inside each layer as if it were `/`). Used by `runv cri` and
//! `runv run --image`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ImageRecord;

pub fn image_config(image: &ImageRecord) -> &Value {
    &image.config["config"]
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned)).collect()
}

/// The command line of a container: the CRI command replaces the image's
/// entrypoint, the CRI args its cmd (Kubernetes' rule).
pub fn command_line(image: &ImageRecord, command: &[String], args: &[String]) -> Vec<String> {
    let c = image_config(image);
    let (entrypoint, cmd) = (strings(&c["Entrypoint"]), strings(&c["Cmd"]));
    let mut line = if command.is_empty() { entrypoint } else { command.to_vec() };
    if !args.is_empty() {
        line.extend(args.iter().cloned());
    } else if command.is_empty() {
        line.extend(cmd);
    }
    line
}

/// The image's environment with `overrides` (KEY, VALUE) set over it, in
/// the image's order, new keys last.
pub fn environment(image: &ImageRecord, overrides: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let mut vars: Vec<(String, String)> = strings(&image_config(image)["Env"])
        .into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv, String::new()),
        })
        .collect();
    for (key, value) in overrides {
        match vars.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => vars.push((key, value)),
        }
    }
    vars.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// uid/gid of a user name (or `uid[:gid]`) in the image's /etc/passwd.
pub fn resolve_user(user: &str, lowers: &[PathBuf]) -> Result<(u32, u32), String> {
    let (name, group) = match user.split_once(':') {
        Some((n, g)) => (n, Some(g)),
        None => (user, None),
    };
    let passwd = image_passwd(lowers);
    let lookup = |name: &str| {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name).then(|| (f[2].parse::<u32>().ok(), f[3].parse::<u32>().ok()))
        })
    };
    let (uid, default_gid) = match name.parse::<u32>() {
        Ok(uid) => (uid, passwd_gid_of(&passwd, uid).unwrap_or(0)),
        Err(_) if name == "root" || name.is_empty() => (0, 0),
        Err(_) => match lookup(name) {
            Some((Some(uid), gid)) => (uid, gid.unwrap_or(0)),
            _ => return Err(format!("user {name:?} is not in the image's /etc/passwd")),
        },
    };
    let gid = match group {
        None | Some("") => default_gid,
        Some(g) => g.parse::<u32>().map_err(|_| format!("group {g:?} must be numeric"))?,
    };
    Ok((uid, gid))
}

/// Largest `/etc/passwd` or `/etc/group` read from an image.
pub const MAX_PASSWD: usize = 1 << 20;

/// The image's `/etc/passwd`.
pub fn image_passwd(lowers: &[PathBuf]) -> String {
    image_file(lowers, "etc/passwd")
}

/// A small file of the image (`etc/passwd`, `etc/group`): from the top
/// layer that has one, read as if the layer were `/` (a symlink to a host
/// file reads nothing of the host).
pub fn image_file(lowers: &[PathBuf], path: &str) -> String {
    for dir in lowers {
        let Ok(root) = crate::fsroot::FsRoot::open(dir) else { continue };
        match root.read_in_root(Path::new(path), MAX_PASSWD) {
            Ok(bytes) => return String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            // A whiteout, a link to nowhere, something too big: no passwd.
            Err(_) => return String::new(),
        }
    }
    String::new()
}

/// The gids of the groups the image's `/etc/group` lists `user` in (by
/// name; a numeric user is looked up in `/etc/passwd` first).
pub fn image_groups_of(user: &str, uid: u32, lowers: &[PathBuf]) -> Vec<i64> {
    let name = if user.is_empty() || user.parse::<u32>().is_ok() {
        let passwd = image_file(lowers, "etc/passwd");
        match passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2].parse::<u32>().ok() == Some(uid))
        {
            Some(f) => f[0].to_string(),
            None => return Vec::new(),
        }
    } else {
        user.to_string()
    };
    image_file(lowers, "etc/group")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[3].split(',').any(|m| m.trim() == name)).then(|| f[2].parse::<i64>().ok()).flatten()
        })
        .collect()
}

pub fn passwd_gid_of(passwd: &str, uid: u32) -> Option<u32> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[3].parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image(config: serde_json::Value) -> ImageRecord {
        ImageRecord::with_config(config)
    }

    #[test]
    fn command_follows_the_kubernetes_rule() {
        let img = image(json!({"config": {"Entrypoint": ["/ep"], "Cmd": ["a", "b"]}}));
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(command_line(&img, &[], &[]), s(&["/ep", "a", "b"]));
        assert_eq!(command_line(&img, &[], &s(&["c"])), s(&["/ep", "c"]));
        assert_eq!(command_line(&img, &s(&["/x"]), &[]), s(&["/x"]));
        assert_eq!(command_line(&img, &s(&["/x"]), &s(&["y"])), s(&["/x", "y"]));
    }

    #[test]
    fn given_variables_override_the_image_environment() {
        let img = image(json!({"config": {"Env": ["PATH=/bin", "A=1"]}}));
        let set = [("A".to_string(), "2".to_string()), ("B".to_string(), "3".to_string())];
        assert_eq!(environment(&img, set), ["PATH=/bin", "A=2", "B=3"]);
    }

    #[test]
    fn users_resolve_through_the_image_passwd() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n")
            .unwrap();
        let lowers = vec![dir.path().to_path_buf()];
        assert_eq!(resolve_user("app", &lowers), Ok((1000, 1001)));
        assert_eq!(resolve_user("1000", &lowers), Ok((1000, 1001)));
        assert_eq!(resolve_user("1000:5", &lowers), Ok((1000, 5)));
        assert_eq!(resolve_user("", &lowers), Ok((0, 0)));
        assert!(resolve_user("nobody-here", &lowers).unwrap_err().contains("nobody-here"));
    }
}
