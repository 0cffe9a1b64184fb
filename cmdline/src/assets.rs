//! What a package ships beside a binary, generated from its clap definition so it cannot
//! drift from the real flags: one man page per command and subcommand (`syncd.1`,
//! `syncd-sync.1`, …; clap_mangen) and completions for bash, zsh and fish (clap_complete).
//!
//! Both binaries call [`generate`] from a hidden `generate-assets DIR` subcommand, which
//! `contrib/deb/build-debs.sh` runs before `cargo deb`.

use std::io;
use std::path::Path;

use clap_complete::Shell;

/// Writes `DIR/man/*.1` and `DIR/completions/{NAME.bash,_NAME,NAME.fish}` for `cmd`.
pub fn generate(cmd: clap::Command, dir: &Path) -> io::Result<()> {
    let name = cmd.get_name().to_owned();
    let mut cmd = cmd.bin_name(&name);
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    // clap_mangen leaves out hidden subcommands and clap's own `help`.
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, &completions)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_for_every_visible_subcommand_and_three_shells() {
        let cmd = clap::Command::new("tool")
            .version("1.2.3")
            .about("Does things")
            .subcommand(clap::Command::new("sync").about("One pass").arg(clap::Arg::new("dry-run").long("dry-run")))
            .subcommand(clap::Command::new("generate-assets").hide(true));
        let d = tempfile::tempdir().unwrap();
        generate(cmd, d.path()).unwrap();
        let mut pages: Vec<String> = std::fs::read_dir(d.path().join("man"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        pages.sort();
        assert_eq!(pages, ["tool-sync.1", "tool.1"]);
        let sync = std::fs::read_to_string(d.path().join("man/tool-sync.1")).unwrap();
        assert!(sync.contains(".TH tool-sync 1") && sync.contains("dry\\-run"), "{sync}");
        for f in ["tool.bash", "_tool", "tool.fish"] {
            let text = std::fs::read_to_string(d.path().join("completions").join(f)).unwrap();
            assert!(text.contains("sync"), "{f}: {text}");
        }
    }
}
